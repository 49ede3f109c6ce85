#!/usr/bin/env bash
# Builds every plugin (policies and adversaries), and the examples, as wasm32-wasip2 components
# (target/wasm32-wasip2/plugin/kframe_*.wasm), installing the target if missing.
# Each plugin is built on its own: a component must carry exactly its own world's
# type information, and cargo would unify the SDK's world features across a
# combined build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
for manifest in plugins/*/Cargo.toml; do
    grep -q '"cdylib"' "$manifest" || continue
    name=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" | head -n 1)
    cargo build --quiet --profile plugin --target wasm32-wasip2 -p "$name"
done
# The examples are crates of their own, as a third party's would be.
cargo build --quiet --release --target wasm32-wasip2 --manifest-path examples/fifo-eviction/Cargo.toml
cargo build --quiet --release --target wasm32-wasip2 --manifest-path examples/most-frequent-probe/Cargo.toml
# A policy built for a WIT version kframe does not load, for the tests that check
# it is refused.
cargo build --quiet --release --target wasm32-wasip2 --manifest-path host/policy/tests/fixtures/other-version/Cargo.toml
# A policy built for the WIT version before the newest, which must still load.
cargo build --quiet --release --target wasm32-wasip2 --manifest-path host/policy/tests/fixtures/policy-v0-2-0/Cargo.toml
