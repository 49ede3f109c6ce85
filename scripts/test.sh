#!/usr/bin/env bash
# Builds everything (the host and every plugin component) and runs the whole
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
./scripts/build-plugins.sh
cargo test --no-fail-fast
