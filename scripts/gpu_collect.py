"""After a GPU session: bring its files (the device tool's files_at folder) into the repository.

    python scripts/gpu_collect.py FILES_AT [--dest DIR]     # FILES_AT: the device tool's files_at folder

bench_<name>.json -> bench/results/gpu_<name>_<device>.json (each holds device name, torch version and commit);
summary.txt -> bench/results/gpu_session_<device>.txt; logs.tar.gz unpacked into bench/out/gpu/ (ignored by git).
Refuses a benchmark file that was not run on a CUDA device or lacks device, torch or commit, so nothing
unattributed gets committed.  --dest replaces bench/results (and the log folder goes beside it, under out/gpu).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files_at")
    p.add_argument("--dest", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    src = Path(a.files_at)
    files = {p.name: p for p in src.rglob("*") if p.is_file()}
    if not files:
        print(f"gpu_collect: no files under {src}")
        return 1
    device = None
    results = Path(a.dest)
    results.mkdir(parents=True, exist_ok=True)
    for name, path in sorted(files.items()):
        m = re.fullmatch(r"bench_(\w+)\.json", name)
        if not m:
            continue
        doc = json.loads(path.read_text())
        env = doc.get("environment", {})
        missing = [k for k in ("device", "torch", "commit") if not env.get(k)]
        if missing or env.get("device_kind") != "cuda":
            print(f"gpu_collect: {name} " + (f"lacks {missing}" if missing else f"ran on {env.get('device_kind')}")
                  + ": not copied")
            continue
        device = slug(env["device"])
        dst = results / f"gpu_{m.group(1)}_{device}.json"
        shutil.copyfile(path, dst)
        part = " (PARTIAL: stopped before the end)" if doc.get("partial") else ""
        print(f"{name}: {len(doc.get('rows', []))} rows, {env['device']}, torch {env['torch']}, "
              f"commit {env['commit'][:12]} -> {dst}{part}")
    if "summary.txt" in files:
        dst = results / f"gpu_session_{device or 'gpu'}.txt"
        shutil.copyfile(files["summary.txt"], dst)
        print(f"summary.txt -> {dst}")
    if "logs.tar.gz" in files:
        out = (ROOT / "bench" / "out" / "gpu") if a.dest == str(ROOT / "bench" / "results") else results / "out" / "gpu"
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(files["logs.tar.gz"]) as t:
            t.extractall(out, filter="data")
        print(f"logs -> {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
