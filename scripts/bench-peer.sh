#!/usr/bin/env bash
# kframe against llama.cpp on the same model and machine, in one command:
#
#   ./scripts/bench-peer.sh            # the table
#   ./scripts/bench-peer.sh --json     # the same as JSON (last thing printed)
#
# Builds llama.cpp (CPU, Release, native) from the vendored copy in the
# llama-cpp-python source release on PyPI, pinned below by version and sha256,
# into target/peer/llama.cpp; then builds kframe (release) and runs
# `kframe bench peer`, which writes the model as GGUF, checks that both engines
# choose the same greedy tokens, and times them in alternating pairs. The first
# build takes tens of minutes on 2 cores (cmake comes from Debian when missing); later
# runs take about a minute. Extra arguments
# go to `kframe bench peer` (see `kframe bench peer --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
peer=target/peer
src=$peer/llama.cpp
bin=$src/build/bin

if [ ! -x "$bin/llama-batched-bench" ] || [ ! -x "$bin/llama-server" ]; then
    if ! command -v cmake >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq cmake >/dev/null
    fi
    mkdir -p "$peer"
    sdist=$peer/llama_cpp_python-$version.tar.gz
    if ! echo "$sha256  $sdist" | sha256sum -c --quiet >/dev/null 2>&1; then
        # The file's address, from PyPI's simple index (JSON form).
        url=$(python3 - "$version" <<'EOF'
import json, sys, urllib.request
req = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
name = f"llama_cpp_python-{sys.argv[1]}.tar.gz"
print(next(f["url"] for f in files if f["filename"] == name))
EOF
)
        echo "bench-peer: downloading $url" >&2
        curl -fsSL -o "$sdist" "$url"
        echo "$sha256  $sdist" | sha256sum -c --quiet
    fi
    rm -rf "$src" "$peer/llama_cpp_python-$version"
    tar -xzf "$sdist" -C "$peer" "llama_cpp_python-$version/vendor/llama.cpp"
    mv "$peer/llama_cpp_python-$version/vendor/llama.cpp" "$src"
    rm -rf "$peer/llama_cpp_python-$version"
    cmake_flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF
                 -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF)
    if grep -qw amx_tile /proc/cpuinfo; then
        # Its AMX buffers crash for batches over 1 on these CPUs: build without.
        # -march=native turns AMX on by itself (the GGML_AMX_* options only count
        # without it); GCC lets an explicit -mno-* win over -march in any order.
        no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        cmake_flags+=("-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx")
    fi
    echo "bench-peer: building llama.cpp $version (vendored in llama-cpp-python) into $src" >&2
    cmake -S "$src" -B "$src/build" "${cmake_flags[@]}" >"$peer/cmake.log" 2>&1 \
        || { tail -20 "$peer/cmake.log" >&2; exit 1; }
    cmake --build "$src/build" -j "$(nproc)" --target llama-batched-bench llama-server \
        >>"$peer/cmake.log" 2>&1 || { tail -30 "$peer/cmake.log" >&2; exit 1; }
fi

./scripts/build-plugins.sh
cargo build --release --quiet -p kframe
exec ./target/release/kframe bench peer --llama-cpp "$bin" --work-dir "$peer" "$@"
