#!/usr/bin/env bash
# Builds kframe (release) and its policy plugins, then runs kframe with the given
# arguments. With no arguments it runs the demo: one prompt in a tenant's private
# frame and in the identity frame, which print the same tokens, on a random-weight
# Qwen2 (the trained embedded model is not committed yet).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
./scripts/build-plugins.sh
cargo build --release --quiet -p kframe
bin=./target/release/kframe
if [ $# -gt 0 ]; then
    exec "$bin" "$@"
fi
model=target/demo-model
[ -f "$model/model.safetensors" ] || "$bin" synth-model --out "$model"
export KFRAME_DATA_DIR=${KFRAME_DATA_DIR:-target/demo-data}
echo "== tenant alice (private frame, probe-time rotation)"
"$bin" generate --model "$model" --tenant alice --prompt "Hello from alice" --max-tokens 16
echo "== identity frame (no rotation)"
"$bin" generate --model "$model" --prompt "Hello from alice" --max-tokens 16
echo "== the shipped policy plugins"
"$bin" plugin check target/wasm32-wasip2/plugin/*.wasm
