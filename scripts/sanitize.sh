#!/usr/bin/env bash
# kvengine — build the CPU extension and the CUDA emulator (tests/cuda_emu: the CUDA kernels on the CPU) with
# AddressSanitizer + UndefinedBehaviorSanitizer and run the op tests under it (the sanitizer runtimes are LD_PRELOADed
# into python); the "emu" tests make this a memcheck of the CUDA kernels too. Any report fails the run.
#   KVENGINE_VENV  the venv made by scripts/setup.sh (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVENGINE_VENV:-.venv}
PY="$(cd "$VENV" && pwd)/bin/python"  # absolute: CMake needs it
B=build/sanitize
PYBIND11_DIR=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())")
# The CPU kernels have an AVX-512 and an AVX2 code path (simd.h); the main build (-march=native) tests the host's.
# On an AVX-512 host this build takes the portable AVX2 one (KVENGINE_NATIVE=OFF), so CI tests both paths there.
NATIVE=${KVENGINE_SANITIZE_NATIVE:-$(grep -qw avx512f /proc/cpuinfo && echo OFF || echo ON)}
echo "[sanitize] KVENGINE_NATIVE=$NATIVE"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVENGINE_SANITIZE=ON -DKVENGINE_CUDA=OFF -DKVENGINE_CUDA_EMU=ON \
  -DKVENGINE_NATIVE="$NATIVE" -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$PYBIND11_DIR" -DSKBUILD_PROJECT_VERSION=0.1.0 \
  > "$B.configure.log"
cmake --build "$B"
STAGE="$B/stage"
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp -r python/kvengine "$STAGE/"
cp "$B"/_C*.so "$B"/libkvengine_ops.so "$B"/libkvengine_emu_ops.so "$B"/_build_config.py "$STAGE/kvengine/"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# python and torch are not instrumented: no leak checking (python keeps objects alive at exit by design)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export KVENGINE_FUZZ_EXAMPLES=${KVENGINE_FUZZ_EXAMPLES:-50}
PYTHONPATH="$STAGE" "$PY" -c "import kvengine, os; assert os.path.dirname(kvengine.__file__).startswith(os.path.abspath('$STAGE')), kvengine.__file__"
PYTHONPATH="$STAGE" "$PY" -m pytest -q -p no:cacheprovider -m "not model" tests/test_fwht.py tests/test_quant.py \
  tests/test_attention.py tests/test_cache.py tests/test_fuzz.py tests/test_binary_attention.py tests/test_retrieval.py "$@"
