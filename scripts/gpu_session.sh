#!/usr/bin/env bash
# kvengine — everything a GPU session needs, in one command for the device tool (build for the card, CUDA tests,
# benchmarks, compute-sanitizer), writing logs and JSON to $OUT (then commit them under bench/results/).
# Prepare once on the dev machine (the device has no network):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl nvidia-cutlass==4.2.0.0
# then: run(command="bash scripts/gpu_session.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvengine-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stage() { echo "=== [gpu] $1 ($(( $(date +%s) - T0 )) s)"; }
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
ARCH=$(python3 -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}' + ('a' if p[0] == 9 else ''))")
stage "build for sm_$ARCH"
KVENGINE_CUDA=ON KVENGINE_CUDA_ARCHS=$ARCH SKBUILD_BUILD_DIR=build/gpu \
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
(cd /tmp && python3 -c "import kvengine, json; print(json.dumps(kvengine.build_info()))") | tee "$OUT/build_info.json"
stage "CUDA tests"
python3 -m pytest tests -q -p no:cacheprovider -m "not model" --maxfail=25 2>&1 | tee "$OUT/tests.log" | tail -30
stage "benchmarks"
for b in fwht quant attention binary retrieval; do
  [ -f "bench/bench_$b.py" ] && python3 "bench/bench_$b.py" --json "$OUT/bench_$b.json" 2>&1 | tee -a "$OUT/bench.log"
done
stage "compute-sanitizer"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
    tests/test_attention.py tests/test_fwht.py tests/test_quant.py tests/test_retrieval_paths.py \
    tests/test_binary_attention.py -k "cuda or tensor_core" \
    > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool exit=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')" | tee -a "$OUT/sanitizer_summary.txt"
done
stage "done"
