"""quantize_pack and the fused rotate_quantize_pack vs their unfused torch compositions, and vs memcpy of the input;
the MSE range search (clip=11, the cache's key setting) vs min/max and vs the torch reference of the search."""
from __future__ import annotations

import torch

from kvengine import ops
from kvengine import reference as ref

from . import bench_main, print_table, randn, rows_list, timeit


def run(device: str, shapes=((8, 8192, 128), (32, 2048, 64)), bits=(2, 4), quick: bool = False,
        dtype=torch.float32) -> list[dict]:
    rows = rows_list()
    rep = 5 if quick else 11
    for (b, T, D) in shapes:
        x = randn(b, T, D, device=device, dtype=dtype, seed=b * T + D)
        ybuf = torch.empty_like(x)
        t_copy = timeit(lambda: ybuf.copy_(x), device, repeat=rep)
        H = ref.hadamard(D, dtype=dtype, device=device) * D ** -0.5
        for nb in bits:
            for mode, G in (("per_channel", 32), ("per_token", 32)):
                t_q = timeit(lambda: ops.quantize_pack(x, nb, G, mode), device, repeat=rep)
                t_qt = timeit(lambda: ref.quantize_pack(x, nb, G, mode), device, repeat=max(3, rep // 3))
                t_f = timeit(lambda: ops.rotate_quantize_pack(x, nb, G, mode), device, repeat=rep)
                t_ft = timeit(lambda: ref.quantize_pack(x @ H, nb, G, mode), device, repeat=max(3, rep // 3))
                t_un = timeit(lambda: ops.quantize_pack(ops.fwht(x), nb, G, mode), device, repeat=rep)
                t_c = timeit(lambda: ops.quantize_pack(x, nb, G, mode, None, 11), device, repeat=rep)
                t_ct = timeit(lambda: ref.quantize_pack(x, nb, G, mode, None, 11), device, repeat=3)
                rows.append({
                    "shape": f"{b}x{T}x{D}", "bits": nb, "mode": mode, "G": G,
                    "quant_us": t_q * 1e6, "torch_quant_us": t_qt * 1e6, "quant_speedup": t_qt / t_q,
                    "fused_us": t_f * 1e6, "unfused_ops_us": t_un * 1e6, "torch_fused_us": t_ft * 1e6,
                    "fused_speedup_vs_torch": t_ft / t_f, "fused_vs_unfused_ops": t_un / t_f,
                    "fused_x_memcpy": t_f / t_copy,
                    "clip11_us": t_c * 1e6, "clip11_x_minmax": t_c / t_q, "torch_clip11_us": t_ct * 1e6,
                    "clip11_speedup": t_ct / t_c,
                })
    print_table(f"quantize_pack / rotate_quantize_pack on {device}, {dtype} (speedups: torch time / kvengine time; "
                "fused_x_memcpy: fused time / memcpy time of the input)", rows,
                ["shape", "bits", "mode", "quant_us", "torch_quant_us", "quant_speedup", "fused_us",
                 "unfused_ops_us", "torch_fused_us", "fused_speedup_vs_torch", "fused_vs_unfused_ops",
                 "fused_x_memcpy", "clip11_us", "clip11_x_minmax", "clip11_speedup"])
    return rows


def _body(device: str, quick: bool) -> list[dict]:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu":
        shapes = ((4, 2048, 128),) if quick else ((8, 8192, 128), (32, 2048, 64))
    else:  # several times the L2
        shapes = ((64, 16384, 128),) if quick else ((64, 32768, 128), (256, 8192, 64))
    rows = run(device, shapes=shapes, quick=quick, dtype=dtype)
    return rows


def main(argv=None):
    return bench_main("quant", __doc__, _body, argv)


if __name__ == "__main__":
    main()
