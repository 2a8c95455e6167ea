#!/usr/bin/env bash
# kvengine — everything a GPU session needs in ONE device call that ends inside its time limit: build for the card
# (or the wheel of `gpu_prepare.sh --prebuild`), a per-op smoke check, the benchmarks of the open issues' targets, the
# CUDA tests, the other benchmarks, compute-sanitizer.  Stages run in that (priority) order, each under `timeout` capped by what is left of KVENGINE_GPU_BUDGET (seconds for the whole script,
# default 500), so the script always reaches its end and writes its files.  $OUT gets at most 8 files (what the
# device tool brings back): summary.txt (printed last as well), logs.tar.gz, bench_{binary,retrieval,attention,
# fwht,quant}.json.
#
#   bash scripts/gpu_prepare.sh [--prebuild]                     # here: CUTLASS wheel + commit id (+ kvengine wheel)
#   run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=560)
#   .venv/bin/python scripts/gpu_collect.py <files_at>           # here: results into bench/results/gpu/
#
# KVENGINE_GPU_STAGES limits the stages (default "build smoke tests bench sanitize").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvengine-gpu}
mkdir -p "$OUT"
LOG=/tmp/kvengine-gpu-logs
rm -rf "$LOG"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$(date +%s)
BUDGET=${KVENGINE_GPU_BUDGET:-500}
STAGES=" ${KVENGINE_GPU_STAGES:-build smoke tests bench sanitize} "
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
pack() { tar -C "$LOG" -czf "$OUT/logs.tar.gz" . 2> /dev/null; }
# run_stage NAME CAP_SECONDS LOGFILE CMD...: the command under timeout min(CAP, time left - 15 s), output to LOGFILE
run_stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local t=$(( $(left) - 15 ))
  (( t > cap )) && t=$cap
  if (( t < 10 )); then say "[$name] skipped: budget spent ($(left) s left)"; return 99; fi
  local s=$(date +%s)
  timeout -k 5 "$t" "$@" > "$log" 2>&1
  local rc=$?
  local note=""
  (( rc == 124 || rc == 137 )) && note=" (stopped at its ${t} s cap)"
  say "[$name] exit $rc in $(( $(date +%s) - s )) s$note"
  pack
  return $rc
}
has() { [[ "$STAGES" == *" $1 "* ]]; }

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f .whl/COMMIT ] && export KVENGINE_COMMIT=$(cat .whl/COMMIT)
say "== kvengine GPU session, commit ${KVENGINE_COMMIT:-unknown}, budget ${BUDGET} s, stages:${STAGES}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$SUMMARY"
ARCH=$(python3 -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}' + ('a' if p[0] == 9 else ''))" \
  2> /dev/null || echo 90a)

# the wheel of `gpu_prepare.sh --prebuild`, where it was built from these very sources, imports under this torch and
# holds this card's architecture: no build here (its own folder, on PYTHONPATH only when it passed)
PRE=$(ls .whl/prebuilt/kvengine-*.whl 2> /dev/null | head -1)
if has build && [ -n "$PRE" ]; then
  if [ "$(cat .whl/prebuilt/SOURCES 2> /dev/null)" != "$(bash scripts/source_hash.sh)" ]; then
    say "[build] prebuilt $(basename "$PRE") not used: built from other sources than this tree's"
  elif python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvpre "$PRE" > "$LOG/prebuilt.log" 2>&1 \
      && (cd /tmp && PYTHONPATH=/tmp/kvpre${PYTHONPATH:+:$PYTHONPATH} python3 -c "import kvengine; i = kvengine.build_info()
assert i['cuda'] and i['cuda_archs'] == '$ARCH', i") >> "$LOG/prebuilt.log" 2>&1; then
    export PYTHONPATH=/tmp/kvpre${PYTHONPATH:+:$PYTHONPATH}
    STAGES=${STAGES/ build / }
    say "[build] prebuilt $(basename "$PRE"): same sources, loads under this torch, sm_$ARCH: not built here"
  else
    say "[build] prebuilt $(basename "$PRE") not used: $(tail -1 "$LOG/prebuilt.log" | cut -c1-200)"
  fi
fi
if has build; then
  # build/gpu survives between calls while the machine stays warm: a rerun only recompiles what changed
  run_stage build 300 "$LOG/build.log" env KVENGINE_CUDA=ON KVENGINE_CUDA_ARCHS="$ARCH" SKBUILD_BUILD_DIR=build/gpu \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install --no-build-isolation --no-deps -q . \
    || { tail -40 "$LOG/build.log" | tee -a "$SUMMARY"; pack; exit 1; }
fi
(cd /tmp && python3 -c "import kvengine, json; print(json.dumps(kvengine.build_info()))") 2>&1 | tee -a "$SUMMARY"

if has smoke; then  # one line per op: runs? agrees with the CPU kernel?
  run_stage smoke 120 "$LOG/smoke.log" python3 scripts/gpu_smoke.py
  grep -E '^ *[0-9]+ (ok|FAIL)' "$LOG/smoke.log" | cut -c1-200 | tee -a "$SUMMARY" | grep -q . \
    || tail -5 "$LOG/smoke.log" | tee -a "$SUMMARY"
fi

# bench_one NAME CAP [ARGS]: one benchmark, its JSON into $OUT, its table (the last lines of its output) into the summary
bench_one() {
  run_stage "bench $1" "$2" "$LOG/bench_$1.log" python3 "bench/bench_$1.py" ${3:-} --json "$OUT/bench_$1.json"
  grep -vE '^(wrote |Traceback|  File )' "$LOG/bench_$1.log" | tail -24 | cut -c1-240 >> "$SUMMARY"  # binary: two tables
}

# the open issues' targets right after the smoke check (which shows every kernel agreeing with the CPU), at their
# sizes: binary (issue 4), retrieval (issue 5); they are what a session's few device minutes are for.
# KVENGINE_GPU_BENCH_ARGS=--quick shrinks them (dry runs)
if has bench; then
  bench_one binary 90 "${KVENGINE_GPU_BENCH_ARGS:-}"
  bench_one retrieval 150 "${KVENGINE_GPU_BENCH_ARGS:-}"
fi

# every CUDA-marked test + the fuzz properties (which draw the device), parallel when xdist is there; not the
# engine-only package build (a second compile of the CUDA sources: CI checks it, the device minutes are for running)
if has tests; then
  XDIST=""
  python3 -c "import xdist" 2> /dev/null && XDIST="-n 8"
  TIMEOUT=""
  python3 -c "import pytest_timeout" 2> /dev/null && TIMEOUT="--timeout 120"
  KVENGINE_FUZZ_EXAMPLES=${KVENGINE_FUZZ_EXAMPLES:-40} run_stage tests 240 "$LOG/tests.log" \
    python3 -m pytest tests -p no:cacheprovider -q $XDIST $TIMEOUT -rfE --tb=short -m "cuda or not model" \
    -k "(cuda or fuzz or tensor_core) and not package_with_cuda_kernels"
  grep -E '^(FAILED|ERROR) ' "$LOG/tests.log" | cut -c1-200 | head -40 | tee -a "$SUMMARY"
  tail -1 "$LOG/tests.log" | tee -a "$SUMMARY"
fi

if has bench; then  # the rest at --quick sizes (on a GPU still several times the L2)
  for b in attention fwht quant; do bench_one $b 90 --quick; done
fi

if has sanitize; then  # every kernel once (the smoke cases, one process) under memcheck, then racecheck
  for tool in memcheck racecheck; do
    run_stage "compute-sanitizer $tool" 120 "$LOG/sanitizer_$tool.log" \
      compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/gpu_smoke.py --only 0
    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race reported' "$LOG/sanitizer_$tool.log" | sort | uniq -c \
      | head -10 | tee -a "$SUMMARY"
  done
fi

say "== done in $(( $(date +%s) - T0 )) s"
pack
echo
cat "$SUMMARY"
