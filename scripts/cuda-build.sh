#!/usr/bin/env bash
# Builds kframe with the `cuda` feature on a machine that has no GPU and no CUDA
# toolkit, and prints the binary's path. The CUDA compiler and libraries come
# from NVIDIA's PyPI wheels (CUDA 13.0, the toolkit of driver 580); the driver
# library, which no wheel ships, is replaced at link time by a stub.
#
# The binary links libcuda, libcublas, libcublasLt, libcurand and libnvrtc
# dynamically; on a GPU machine the real driver and those libraries must be on
# the loader's path (for the wheels: LD_LIBRARY_PATH=.../nvidia/cu13/lib).
#
#   ./scripts/cuda-build.sh            # target/cuda/release/kframe
#   CUDA_COMPUTE_CAP=80 ./scripts/cuda-build.sh
#
# It also writes target/cuda/kframe.xz, the binary stripped and compressed
# (about 22 MB, against 300 MB with debug info) for copying to a GPU machine,
# where scripts/gpu-check.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

root="$PWD/target/cuda"
mkdir -p "$root"

# 1. The toolkit, pinned to one CUDA release so the headers, nvcc and the
#    libraries agree. `--no-deps`: the wheels' own dependencies pull in the
#    cu12 generation beside them.
venv="$root/python"
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
    fi
fi
wheels=(
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88"
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
    "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35"
)
stamp="$root/wheels.txt"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${wheels[*]}" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "${wheels[@]}"
    echo "${wheels[*]}" > "$stamp"
fi
cu13=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')

# 2. A toolkit folder laid out as cudarc and candle-kernels' build scripts
#    expect it: bin/nvcc, include, nvvm, and lib64 with unversioned .so names.
toolkit="$root/toolkit"
mkdir -p "$toolkit/lib64/stubs"
ln -sfn "$cu13/bin" "$toolkit/bin"
ln -sfn "$cu13/include" "$toolkit/include"
ln -sfn "$cu13/nvvm" "$toolkit/nvvm"
for lib in "$cu13"/lib/lib*.so.*; do
    name=$(basename "$lib")
    ln -sfn "$lib" "$toolkit/lib64/$name"
    ln -sfn "$lib" "$toolkit/lib64/${name%%.so.*}.so"
done

# 3. libcuda comes with a GPU driver. For linking, a stub that exports every
#    driver entry point cudarc declares, each failing with CUDA_ERROR_UNKNOWN
#    (999). It lives only in lib64/stubs, which the binary never loads from:
#    never put that folder on LD_LIBRARY_PATH where a real driver is.
cudarc=$(cargo metadata --format-version 1 --features kframe/cuda 2>/dev/null | python3 -c '
import json, sys, os
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))
        break')
[ -n "$cudarc" ] || { echo "cudarc is not in the dependency graph" >&2; exit 1; }
stub="$toolkit/lib64/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$cudarc/src/driver/sys/mod.rs" -nt "$stub" ]; then
    grep -o 'load::<_F>("cu[A-Za-z0-9_]*")' "$cudarc/src/driver/sys/mod.rs" \
        | sed 's/.*("\(.*\)")/int \1(void) { return 999; }/' | sort -u > "$root/libcuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/libcuda-stub.c"
    ln -sfn libcuda.so "$toolkit/lib64/stubs/libcuda.so.1"
fi

# 4. The build. There is no GPU to ask for its compute capability, so it is
#    given: 90 is the H100/H200 generation.
export CUDA_ROOT="$toolkit" CUDA_PATH="$toolkit" CUDA_HOME="$toolkit"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export PATH="$toolkit/bin:$PATH"
export LIBRARY_PATH="$toolkit/lib64:$toolkit/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release -p kframe --features cuda --target-dir target/cuda >&2
strip -o "$root/kframe.stripped" "$root/release/kframe"
xz -T0 -6 -f "$root/kframe.stripped"
mv "$root/kframe.stripped.xz" "$root/kframe.xz"
echo "target/cuda/release/kframe"
