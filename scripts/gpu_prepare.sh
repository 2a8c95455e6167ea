#!/usr/bin/env bash
# kvengine — run here (with network) before a GPU session: the CUTLASS/CuTe headers wheel (the device machine has no
# network) and the commit id (the device gets the working tree without .git) into .whl/, which .gitignore ignores and
# the device call carries:  run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=560)
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
echo "[gpu_prepare] .whl: $(ls .whl | tr '\n' ' ')($(du -sh .whl | cut -f1)); commit $c"
