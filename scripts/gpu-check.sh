#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (driver 580 or newer, CUDA 13): runs the cuda
# build's device checks and the rotation bench there, in a few minutes.
#
#   ./scripts/gpu-check.sh [target/cuda/kframe.xz]
#
# The binary comes from scripts/cuda-build.sh, built on any machine. It needs
# the driver's libcuda and CUDA 13's cuBLAS, cuRAND, NVRTC and runtime
# libraries: from the loader's path, or else from the NVIDIA PyPI wheels of
# whichever python3 has them. Reports go to $OUT (or target/gpu-check): the
# device checks (check-device.json) and the rotation bench (rotation.json).
set -euo pipefail
cd "$(dirname "$0")/.."
packed="${1:-target/cuda/kframe.xz}"
out="${OUT:-target/gpu-check}"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin="$work/kframe"
xz -dc "$packed" > "$bin"
chmod +x "$bin"

missing() { ldd "$bin" | grep 'not found' || true; }
if [ -n "$(missing)" ]; then
    for py in python3 /usr/bin/python3 /opt/*/bin/python3 "$HOME"/*/bin/python3; do
        command -v "$py" >/dev/null 2>&1 || continue
        libs=$("$py" -c 'import glob, os, nvidia
print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(os.path.join(p, "*", "lib")))))' 2>/dev/null) || continue
        [ -n "$libs" ] || continue
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        [ -z "$(missing)" ] && break
    done
fi
if [ -n "$(missing)" ]; then
    echo "the cuda build cannot start here; these libraries are missing:" >&2
    missing >&2
    exit 1
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/gpu.csv"
echo "== device checks on cuda"
status=0
"$bin" check-device --device cuda --json > "$out/check-device.json" || status=1
python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
for c in r["checks"]:
    print("PASS" if c["passed"] else "FAIL", c["name"] + ":", c["detail"])' "$out/check-device.json"
echo "== rotation bench on cuda"
"$bin" bench rotation --device cuda --rounds 20 --json > "$out/rotation.json"
python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
for k in ("device", "probe_over_identity_ctx512", "probe_over_identity_ctx4096", "decode_over_probe_ctx4096", "kframe_over_candle"):
    print(k, r[k])' "$out/rotation.json"
exit $status
