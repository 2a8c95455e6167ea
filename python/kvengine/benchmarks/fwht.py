"""fwht vs a dense matmul with H_n and vs a memcpy of the same bytes (the headline: time / memcpy time)."""
from __future__ import annotations

import torch

import kvengine
from kvengine import reference as ref

from . import bench_main, print_table, randn, rows_list, timeit


def run(device: str, dtypes=("float32", "bfloat16"), sizes=(64, 128, 256, 1024, 8192), total_mb: float = 32.0,
        quick: bool = False) -> list[dict]:
    rows = rows_list()
    for dt_name in dtypes:
        dt = getattr(torch, dt_name)
        for n in sizes:
            esz = torch.finfo(dt).bits // 8
            nrows = max(1, int(total_mb * 2**20 / (n * esz)))
            x = randn(nrows, n, device=device, dtype=dt, seed=n)
            y = torch.empty_like(x)
            nbytes = 2 * x.numel() * esz  # read + write
            rep = 5 if quick else 15
            t_k = timeit(lambda: kvengine.fwht(x), device, repeat=rep)  # allocates its output
            t_clone = timeit(lambda: x.clone(), device, repeat=rep)  # memcpy that allocates, same as fwht
            t_ip = timeit(lambda: kvengine.fwht_(x), device, repeat=rep)  # in place: no allocation
            t_copy = timeit(lambda: y.copy_(x), device, repeat=rep)  # memcpy into a preallocated buffer
            t_mm = None
            if n <= 1024:
                H = ref.hadamard(n, dtype=dt, device=device) * (n ** -0.5)
                t_mm = timeit(lambda: torch.matmul(x, H), device, repeat=5 if quick else 15)
            rows.append({
                "dtype": dt_name, "n": n, "rows": nrows, "MB": round(x.numel() * esz / 2**20, 1),
                "fwht_us": t_k * 1e6, "clone_us": t_clone * 1e6, "fwht_inplace_us": t_ip * 1e6,
                "memcpy_us": t_copy * 1e6, "matmul_us": t_mm * 1e6 if t_mm else None,
                "fwht_GBps": nbytes / t_k / 1e9, "fwht_inplace_GBps": nbytes / t_ip / 1e9,
                "memcpy_GBps": nbytes / t_copy / 1e9,
                "x_memcpy_bw": t_copy / t_ip, "fwht_vs_clone": t_clone / t_k,
                "speedup_vs_matmul": (t_mm / t_k) if t_mm else None,
            })
    print_table(f"fwht on {device}: x_memcpy_bw = memcpy time / in-place fwht_ time (fraction of memcpy bandwidth; "
                "CPU target >= 0.5); fwht_vs_clone = allocating copy time / allocating fwht time; "
                "speedup_vs_matmul = x @ H_n time / fwht time", rows,
                ["dtype", "n", "MB", "fwht_us", "clone_us", "fwht_inplace_us", "memcpy_us", "matmul_us",
                 "fwht_inplace_GBps", "memcpy_GBps", "x_memcpy_bw", "fwht_vs_clone", "speedup_vs_matmul"])
    return rows


def _body(device: str, quick: bool) -> list[dict]:
    # on a GPU well past the L2 (50-60 MB on an H100/H200), else the cache is measured, not the memory
    mb = (8.0 if quick else 32.0) if device == "cpu" else (256.0 if quick else 1024.0)
    rows = run(device, quick=quick, total_mb=mb)
    return rows


def main(argv=None):
    return bench_main("fwht", __doc__, _body, argv)


if __name__ == "__main__":
    main()
