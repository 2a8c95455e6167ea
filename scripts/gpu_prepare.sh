#!/usr/bin/env bash
# kvengine — run here (with network) before a GPU session: the CUTLASS/CuTe headers wheel (the device machine has no
# network) and the commit id (the device gets the working tree without .git) into .whl/, which .gitignore ignores and
# the device call carries:  run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=560)
#
#   bash scripts/gpu_prepare.sh              # the CUTLASS wheel + COMMIT
#   bash scripts/gpu_prepare.sh --prebuild   # also kvengine built for the device, so its call skips the build
#
# --prebuild: the device's build stage (~2 min of a session's 15 device minutes: attention.cu alone compiles for
# ~100 s) moves here. Python 3.12 + torch 2.11.0 from PyPI (its CUDA 13.0 build, which names itself 2.11.0+cu130 as
# the device's does; a 4.7 GB venv with its CUDA libraries, once: .venv-gpu312), CUDA for sm_90a, CPU kernels for
# AVX2+FMA+F16C (the device's CPU is not this one): the wheel into .whl/prebuilt/ with the hash of the sources it
# was built from (scripts/source_hash.sh). gpu_session.sh installs it only where the hash of its copy of the tree is
# the same, it imports under the device's torch and its architectures are the card's; else it builds there as before.
# KVENGINE_GPU_PYTHON / KVENGINE_GPU_TORCH override the interpreter / torch version (~5 min of 2 cores to build).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
if ! ls .whl/nvidia_cutlass-4.2.0.0-*.whl > /dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl nvidia-cutlass==4.2.0.0
fi
c=$(git rev-parse HEAD)
git diff --quiet HEAD -- . || c="$c-dirty"
echo "$c" > .whl/COMMIT
rm -rf .whl/prebuilt
if [ "${1:-}" = "--prebuild" ]; then
  PY=${KVENGINE_GPU_PYTHON:-}
  if [ -z "$PY" ]; then  # the device's Python is 3.12 (pyenv's shim may exist and still refuse to run)
    for p in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
      "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null && { PY=$p; break; }
    done
    [ -n "$PY" ] || { echo "[gpu_prepare] --prebuild needs Python 3.12 (KVENGINE_GPU_PYTHON=...)"; exit 1; }
  fi
  V=.venv-gpu312
  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"
  echo "[gpu_prepare] torch==${KVENGINE_GPU_TORCH:-2.11.0} and the build tools into $V"
  "$V/bin/python" -m pip install -q "torch==${KVENGINE_GPU_TORCH:-2.11.0}" "scikit-build-core>=0.10" "pybind11>=2.12" \
    ninja numpy
  "$V/bin/python" -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
  echo "[gpu_prepare] building the kvengine wheel for sm_90a in build/gpu312"
  mkdir -p .whl/prebuilt
  h=$(bash scripts/source_hash.sh)  # before the build: what it reads
  PATH=/usr/local/cuda/bin:$PATH KVENGINE_CUDA=ON KVENGINE_CUDA_ARCHS=90a KVENGINE_CUDA_EMU=OFF KVENGINE_NATIVE=OFF \
    SKBUILD_BUILD_DIR=build/gpu312 "$V/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w .whl/prebuilt .
  echo "$h" > .whl/prebuilt/SOURCES
fi
echo "[gpu_prepare] .whl: $(cd .whl && find . -type f | sort | tr '\n' ' ')($(du -sh .whl | cut -f1)); commit $c"
