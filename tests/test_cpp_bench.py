"""bench/cpp: the Google-Benchmark microbenchmarks of the torch-free API, built the way their README line says
(against the engine's own CMake targets), run once each with a tiny time budget.  Checked: every registered benchmark
ran, every time is positive and every counter agrees with its time (the per-token counter once carried seconds under
a name that said nanoseconds).  No timing is asserted.

Without Google Benchmark (libbenchmark-dev) the bench's CMake skips its target, and so does this test, saying so;
CI sets KVENGINE_REQUIRE_CPP_BENCH=1 so that a missing library fails instead."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# family -> number of registered argument sets (bench/cpp/bench_engine.cpp)
FAMILIES = {"BM_memcpy": 1, "BM_fwht": 5, "BM_quantize_pack": 3, "BM_quant_decode_attention": 6,
            "BM_fp32_decode_attention": 2, "BM_binary_attention_decode": 4}
DECODE_HEADS = 8  # DecodeSetup::H: KV heads of the decode benchmarks


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cmake = shutil.which("cmake")
    assert cmake, "cmake (>= 3.25) not found"
    build = tmp_path_factory.mktemp("bench_cpp")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = _run([cmake, "-S", ROOT / "bench" / "cpp", "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release"])
    _run([cmake, "--build", build, "-j", os.cpu_count() or 2])
    exe = build / "kvengine_bench"
    if not exe.exists():
        msg = "Google Benchmark not found: bench/cpp was not built (apt-get install libbenchmark-dev)"
        assert "Google Benchmark not found" in cfg.stderr + cfg.stdout, "kvengine_bench missing after the build"
        if os.environ.get("KVENGINE_REQUIRE_CPP_BENCH") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    out = _run([exe, "--benchmark_min_time=0.001", "--benchmark_format=json"], timeout=600)
    return json.loads(out.stdout)["benchmarks"]


def test_every_benchmark_runs(results):
    counts = {}
    for b in results:
        fam = b["run_name"].split("/")[0]
        counts[fam] = counts.get(fam, 0) + 1
        assert b["real_time"] > 0 and b["iterations"] >= 1, b["name"]
        assert b.get("error_occurred") is not True, b
    assert counts == FAMILIES


def test_counters_agree_with_the_times(results):
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    for b in results:
        t = b["real_time"] * unit[b["time_unit"]]  # seconds per iteration
        if "s_per_token_head" in b:
            n = int(re.match(r"BM_\w+/(\d+)", b["run_name"]).group(1))  # the context length is the first argument
            assert b["s_per_token_head"] == pytest.approx(t / (n * DECODE_HEADS), rel=1e-3), b["name"]
        else:
            assert b["bytes_per_second"] > 0, b["name"]
    decode = [b for b in results if b["run_name"].startswith(("BM_quant_decode", "BM_fp32_decode"))]
    assert len(decode) == 8 and all("s_per_token_head" in b for b in decode)
