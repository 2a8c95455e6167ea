"""The GPU-session tooling (scripts/gpu_smoke.py, scripts/gpu_collect.py, the benchmarks' partial-row writing) runs
only a few minutes per GPU session, so it is exercised here on the CPU: a broken script would waste the session."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "scripts" / "gpu_smoke.py"


def _smoke(**env):
    e = dict(os.environ, KVENGINE_SMOKE_DEVICE="cpu", OMP_NUM_THREADS="1", **env)
    p = subprocess.run([sys.executable, str(SMOKE)], env=e, capture_output=True, text=True, timeout=300)
    lines = [ln.split() for ln in p.stdout.splitlines() if ln.split() and ln.split()[0].isdigit()]
    return p.returncode, lines, p


def _names():
    out = subprocess.run([sys.executable, str(SMOKE), "--list"], capture_output=True, text=True, timeout=60).stdout
    return [ln.split()[1] for ln in out.splitlines()]


def test_smoke_runs_every_case_against_itself_on_cpu():
    rc, lines, p = _smoke()
    names = _names()
    assert len(names) >= 14, names
    assert rc == 0, p.stdout + p.stderr
    assert [ln[2] for ln in lines] == names
    assert all(ln[1] == "ok" for ln in lines), p.stdout


def test_smoke_goes_on_after_a_case_that_kills_its_process():
    names = _names()
    victim = names[3]
    rc, lines, p = _smoke(KVENGINE_SMOKE_CRASH=victim)
    assert rc == 1, p.stdout
    assert [ln[2] for ln in lines] == names  # every case reported once, in order
    status = {ln[2]: ln[1] for ln in lines}
    assert status[victim] == "FAIL"
    assert all(s == "ok" for n, s in status.items() if n != victim), p.stdout


def _bench_doc(tmp_path, name, kind, commit="abc123"):
    doc = {"benchmark": name, "environment": {"device": "NVIDIA H200" if kind == "cuda" else "x86_64",
                                              "device_kind": kind, "torch": "2.11.0+cu130", "commit": commit},
           "rows": [{"x": 1}]}
    (tmp_path / f"bench_{name}.json").write_text(json.dumps(doc))


def test_collect_copies_only_attributed_cuda_results(tmp_path):
    src, dest = tmp_path / "files", tmp_path / "results"
    src.mkdir()
    _bench_doc(src, "binary", "cuda")
    _bench_doc(src, "fwht", "cpu")
    _bench_doc(src, "quant", "cuda", commit=None)
    (src / "summary.txt").write_text("== kvengine GPU session\n")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_collect.py"), str(src), "--dest", str(dest)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    got = sorted(f.name for f in dest.iterdir() if f.is_file())
    assert got == ["gpu_binary_nvidia_h200.json", "gpu_session_nvidia_h200.txt"], (got, p.stdout)
    assert "ran on cpu: not copied" in p.stdout and "lacks ['commit']" in p.stdout


def test_benchmark_stopped_by_sigterm_writes_its_finished_rows(tmp_path):
    out = tmp_path / "b.json"
    code = (
        "import sys, time\n"
        "from kvengine.benchmarks import bench_main, rows_list\n"
        "def body(dev, quick):\n"
        "    rows = rows_list()\n"
        "    for i in range(1000):\n"
        "        rows.append({'i': i}); print('row', i, flush=True); time.sleep(0.05)\n"
        "    return rows\n"
        f"bench_main('t', 'doc', body, ['--device', 'cpu', '--json', {str(out)!r}])\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait for a few rows
        if line.startswith("row 3"):
            break
    p.send_signal(signal.SIGTERM)
    p.stdout.read()
    assert p.wait(timeout=60) == 3
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and len(doc["rows"]) >= 4
    assert [r["i"] for r in doc["rows"]] == list(range(len(doc["rows"])))


def test_benchmark_commit_falls_back_to_the_session_variable(monkeypatch):
    from kvengine import benchmarks

    monkeypatch.setenv("KVENGINE_COMMIT", "feedface")
    real = subprocess.run
    monkeypatch.setattr(benchmarks.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    try:
        assert benchmarks.environment("cpu")["commit"] == "feedface"
    finally:
        monkeypatch.setattr(benchmarks.subprocess, "run", real)


def test_source_hash_follows_the_sources_not_the_build_litter(tmp_path):
    """scripts/source_hash.sh decides whether the device may use a prebuilt wheel: it must change with any source file
    and ignore what never reaches the device's copy of the tree (__pycache__, *.so, the generated _build_config.py)."""
    import shutil

    tree = tmp_path / "tree"
    for d in ("cpp", "cuda", "python", "scripts"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_config.py"))
    for f in ("CMakeLists.txt", "pyproject.toml"):
        shutil.copy(ROOT / f, tree / f)

    def h():
        p = subprocess.run(["bash", str(tree / "scripts" / "source_hash.sh")], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and len(p.stdout.strip()) == 16, p.stdout + p.stderr
        return p.stdout.strip()

    base = h()
    (tree / "python" / "kvengine" / "__pycache__").mkdir(exist_ok=True)
    (tree / "python" / "kvengine" / "__pycache__" / "ops.cpython-312.pyc").write_bytes(b"x")
    (tree / "python" / "kvengine" / "_C.so").write_bytes(b"x")
    (tree / "python" / "kvengine" / "_build_config.py").write_text("TORCH_VERSION = 'x'\n")
    assert h() == base
    cu = next((tree / "cuda" / "src").glob("*.cu"))
    cu.write_text(cu.read_text() + "\n")
    assert h() != base
