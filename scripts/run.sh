#!/usr/bin/env bash
# Builds kframe (release) and its policy plugins, then runs kframe with the given
# arguments. With no arguments it checks the shipped plugins and serves the HTTP
# API (`kframe serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
./scripts/build-plugins.sh
cargo build --release --quiet -p kframe
bin=./target/release/kframe
if [ $# -gt 0 ]; then
    exec "$bin" "$@"
fi
# The demo: serve the OpenAI-compatible API on 127.0.0.1:8080 (KFRAME_ADDR to
# change it) on the embedded model, kframe's own tiny Qwen2.
export KFRAME_DATA_DIR=${KFRAME_DATA_DIR:-target/demo-data}
"$bin" plugin check target/wasm32-wasip2/plugin/*.wasm
addr=${KFRAME_ADDR:-127.0.0.1:8080}
echo "try: examples/http/curl.sh   (admin token in $KFRAME_DATA_DIR/admin.token)"
exec "$bin" serve --addr "$addr"
