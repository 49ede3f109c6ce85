#!/usr/bin/env bash
# Checks (and where it can, installs) what building kframe needs. Sourced by
# run.sh and test.sh, so the README's two commands work on a fresh machine.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "kframe needs a Rust toolchain (1.95 or newer): https://rustup.rs" >&2
        exit 1
    fi
fi
if ! command -v cc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    # Some dependencies compile a little C.
    apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
fi
