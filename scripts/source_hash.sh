#!/usr/bin/env bash
# kvengine — a short hash of the files a build of kvengine reads (CMake, the C++/CUDA sources, the Python package).
# The same list here and on the GPU machine, whose copy of the tree has no .git: what .gitignore keeps out of the
# copy (__pycache__, *.so, the generated _build_config.py) is left out here too. gpu_prepare.sh --prebuild stores it
# beside the wheel it builds; gpu_session.sh uses that wheel only when the hash of its own copy is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
find CMakeLists.txt pyproject.toml cpp cuda python -type f ! -name '*.pyc' ! -name '*.so' ! -name '_build_config.py' \
  ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum \
  | cut -c1-16
