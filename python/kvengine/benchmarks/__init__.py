"""kvengine benchmarks: each compares a kernel with its baselines side by side in one process, prints a table
with ratios and returns rows for JSON.  Run them with ``kvengine bench`` or ``python bench/bench_<name>.py``."""
from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import time
from typing import Callable, Iterable

import torch

import kvengine


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str = "cpu", repeat: int = 15, min_time: float = 0.02) -> float:
    """Median seconds per call.  Warm-up first; each sample runs enough calls to last ``min_time``; CUDA timed with
    events."""
    fn()
    sync(device)
    # calibrate the number of calls per sample
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_time / one))
    samples = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(number):
                fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / 1e3 / number)
        else:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def timeit_paired(fns: list[Callable[[], object]], device: str = "cpu", repeat: int = 9
                  ) -> tuple[list[float], list[float]]:
    """Interleaved timing for noisy shared machines: each of ``repeat`` rounds times every function once, in turn,
    so that a slow spell of the machine hits all of them.  Returns the median seconds of each and, for each, the
    median over rounds of ``time(fns[0]) / time(fn)`` (paired ratios; 1.0 for the first)."""
    for fn in fns:
        fn()
    sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, samples):
            if device.startswith("cuda"):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    medians = [statistics.median(x) for x in samples]
    ratios = [statistics.median(a / b for a, b in zip(samples[0], x)) for x in samples]
    return medians, ratios


def randn(*shape: int, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """N(0, 1) data drawn on the device itself (a GPU benchmark never builds gigabytes on the host), seeded."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


def sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention (one query token, no mask) with GQA as one SDPA call whose query rows are the group's query
    heads: q [B, Hq, 1, D] viewed as [B, Hkv, Hq / Hkv, D] against k, v [B, Hkv, N, D]. The same attention as
    ``enable_gqa=True`` without any copy of K/V; on the CPU ``enable_gqa`` measured 1.7-3.5x slower (it expands K/V to
    every query head), so speed-ups against it alone were inflated."""
    B, Hq, T, D = q.shape
    assert T == 1, "sdpa_grouped: one query token"
    Hkv = k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v)
    return out.reshape(B, Hq, 1, D)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def best_sdpa_decode(q, k, v, device: str, repeat: int, min_time: float = 0.02) -> dict:
    """Both exact SDPA forms of a GQA decode step timed; the faster one is the baseline (``sdpa_us``)."""
    t_g = timeit(lambda: sdpa_grouped(q, k, v), device, repeat=repeat, min_time=min_time)
    t_e = timeit(lambda: sdpa_gqa(q, k, v), device, repeat=repeat, min_time=min_time)
    return {"sdpa_s": min(t_g, t_e), "sdpa_grouped_us": t_g * 1e6, "sdpa_enable_gqa_us": t_e * 1e6,
            "sdpa_form": "grouped" if t_g <= t_e else "enable_gqa"}


_ROWS: list[dict] = []


def rows_list() -> list[dict]:
    """The list a benchmark appends its rows to: if the run is stopped (SIGTERM, e.g. a session's time cap) before
    it returns, ``bench_main`` still writes the rows finished so far (marked ``"partial": true``)."""
    _ROWS.clear()
    return _ROWS


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped(f"signal {signum}")


def _cpu_model() -> str | None:
    """The host CPU's model name, family and model (CPU timings differ by machine: the perf log names the one it
    measured)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or None
    name = fields.get("model name") or platform.processor() or None
    if name and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def environment(device: str) -> dict:
    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine()),
        "device_kind": "cuda" if device.startswith("cuda") else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "kvengine": kvengine.build_info(),
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        info["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                        timeout=5).stdout.strip() or None
    except Exception:
        info["commit"] = None
    # a copy of the tree without .git (the GPU session's): the commit id the session script was given
    info["commit"] = info["commit"] or os.environ.get("KVENGINE_COMMIT") or None
    return info


def print_table(title: str, rows: list[dict], cols: Iterable[str]) -> None:
    cols = list(cols)
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def write_json(path: str | None, name: str, device: str, rows: list[dict], partial: bool = False) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"benchmark": name, "environment": environment(device), "rows": rows}
    if partial:
        doc["partial"] = True
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}" + (f" ({len(rows)} rows, stopped before the end)" if partial else ""))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and kvengine.build_info()["cuda"] else "cpu"


def bench_main(name: str, doc: str, body: Callable, argv=None, options: Callable | None = None) -> list[dict]:
    """The command line every benchmark shares: --device, --json, --quick; body(device, quick) -> rows.  With
    ``options(parser)`` adding a benchmark's own arguments, body(device, quick, args) gets them too."""
    import argparse

    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--device", default=default_device())
    p.add_argument("--json", default=None, help="write the rows and the environment (device, torch, commit) here")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    if options is not None:
        options(p)
    a = p.parse_args(argv)
    old = signal.signal(signal.SIGTERM, _stop)
    try:
        rows = body(a.device, a.quick, a) if options is not None else body(a.device, a.quick)
    except (_Stopped, KeyboardInterrupt) as e:
        print(f"{name}: stopped ({e or 'interrupt'}); writing the {len(_ROWS)} rows finished")
        write_json(a.json, name, a.device, list(_ROWS), partial=True)
        raise SystemExit(3)
    finally:
        signal.signal(signal.SIGTERM, old)
    write_json(a.json, name, a.device, rows)
    return rows
