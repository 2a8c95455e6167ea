"""1-bit QK attention (BinaryAttention) prefill: kvengine.binary_attention (popcount scores, fp32 P·V, one fused
pass) vs torch SDPA (fp32 on CPU, bf16 on GPU) on the same shapes, B·H = 32, non-causal, side by side.  On CUDA also
the tensor-core kernel (KVENGINE_BINARY_MMA=1: b1 AND+popc MMA for QK, bf16 MMA for P·V; 8-warp CTAs and, as
mma_4warp_ms, 4-warp ones) with its deviation from the CUDA-core kernel; SDPA is forced to the flash backend there
(sdpa_ms, the issue's baseline) and also timed with torch's own backend choice (sdpa_default_ms).  On the CPU the
three calls are timed in interleaved rounds and speedup_vs_sdpa is the median of the per-round ratios (shared machines
are noisy).

Decode rows (``mode`` decode): one new query token per step over a cache of 1-bit keys (``binary_attention_packed``,
the keys packed once as a cache holds them) and full-precision values, GQA 32 query / 8 KV heads, vs SDPA on the
same fp32 (GPU: bf16) K/V with the group's query heads as query rows (no K/V copy; torch's ``enable_gqa`` is timed
too). Also the path every such call took before the split path existed, forced (``tile_path_ms``; CPU:
``KVENGINE_BINARY_CPU_SPLIT=0``, one work item per query head, K / V laid out by a pre-pass; CUDA:
``KVENGINE_BINARY_CUDA_SPLIT=0``, one CTA per query head, a single valid row in each).  ``GBps``: bytes of V, key bits and key
scales over the binary time (decode reads each once)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from kvengine import ops

from . import bench_main, print_table, randn, rows_list, sdpa_gqa, sdpa_grouped, timeit, timeit_paired


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _mma(on: bool):
    return _env("KVENGINE_BINARY_MMA", "1" if on else "0")


def _sdpa_flash(q, k, v):
    """SDPA forced to the flash backend on CUDA (the issue's baseline); torch's own choice is timed as well."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def run(device: str, lengths=(1024, 4096), dims=(64, 128), B=1, H=32, quick=False) -> list[dict]:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = rows_list()
    rep = 3 if quick else 15  # GPU
    for L in lengths:
        for D in dims:
            q, k, v = (randn(B, H, L, D, device=device, dtype=dtype, seed=3 * (L + D) + i) for i in range(3))
            kb, ks = ops.sign_pack(k, center=True)
            if device == "cpu":  # a shared CPU: interleaved rounds, speed-up = median of the per-round ratios
                (t_sdpa, t_bin, t_packed), (_, speedup, _) = timeit_paired(
                    [lambda: F.scaled_dot_product_attention(q, k, v), lambda: ops.binary_attention(q, k, v),
                     lambda: ops.binary_attention_packed(q, kb, ks, v)], device, repeat=3 if quick else 9)
            else:
                t_sdpa = timeit(lambda: _sdpa_flash(q, k, v), device, repeat=rep, min_time=0.0)
                t_sdpa_any = timeit(lambda: F.scaled_dot_product_attention(q, k, v), device, repeat=rep, min_time=0.0)
                with _mma(False):
                    t_bin = timeit(lambda: ops.binary_attention(q, k, v), device, repeat=rep, min_time=0.0)
                    out_core = ops.binary_attention(q, k, v)
                t_packed = timeit(lambda: ops.binary_attention_packed(q, kb, ks, v), device, repeat=rep, min_time=0.0)
                speedup = t_sdpa / t_bin
            flops = 4.0 * B * H * L * L * D  # QKᵀ + PV of dense attention
            extra = {}
            if device != "cpu" and D <= 128:
                with _mma(True):
                    t_mma = timeit(lambda: ops.binary_attention(q, k, v), device, repeat=rep, min_time=0.0)
                    out_mma = ops.binary_attention(q, k, v)
                    with _env("KVENGINE_BINARY_MMA_WARPS", "4"):  # 64-row CTAs: twice the L2 reads of V
                        t_mma4 = timeit(lambda: ops.binary_attention(q, k, v), device, repeat=rep, min_time=0.0)
                dev = ((out_mma.float() - out_core.float()).norm(dim=-1) / out_core.float().norm(dim=-1)).max()
                extra = {"sdpa_default_ms": t_sdpa_any * 1e3, "mma_ms": t_mma * 1e3, "mma_4warp_ms": t_mma4 * 1e3,
                         "mma_vs_core": t_bin / t_mma, "mma_speedup_vs_sdpa": t_sdpa / t_mma,
                         "mma_speedup_vs_sdpa_default": t_sdpa_any / t_mma, "mma_max_row_dev": float(dev)}
            rows.append({
                "L": L, "D": D, "BH": B * H, "dtype": str(dtype).replace("torch.", ""),
                "binary_ms": t_bin * 1e3, "binary_packed_ms": t_packed * 1e3, "sdpa_ms": t_sdpa * 1e3,
                "sdpa_TFLOPs": flops / t_sdpa / 1e12, "speedup_vs_sdpa": speedup, **extra,
            })
            del q, k, v
    print_table(f"binary attention on {device}: kvengine.binary_attention vs SDPA ({dtype}), B·H = {B * H}; "
                "speedup = SDPA time / binary time", rows,
                ["L", "D", "BH", "dtype", "binary_ms", "binary_packed_ms", "sdpa_ms", "sdpa_TFLOPs", "speedup_vs_sdpa"]
                + (["sdpa_default_ms", "mma_ms", "mma_4warp_ms", "mma_vs_core", "mma_speedup_vs_sdpa",
                    "mma_speedup_vs_sdpa_default", "mma_max_row_dev"] if device != "cpu" else []))
    return rows


def run_decode(device: str, contexts=(4096, 32768), dims=(128,), B=1, Hq=32, Hkv=8, quick=False,
               rows: list[dict] | None = None) -> list[dict]:
    """Decode rows, appended to ``rows`` (default: a fresh list from rows_list())."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = rows_list() if rows is None else rows
    mine = []
    for L in contexts:
        for D in dims:
            q = randn(B, Hq, 1, D, device=device, dtype=dtype, seed=L + D)
            k, v = (randn(B, Hkv, L, D, device=device, dtype=dtype, seed=L + D + i) for i in (1, 2))
            kb, ks = ops.sign_pack(k, center=True)
            fns = [lambda: sdpa_grouped(q, k, v),  # the group's query heads as query rows: no K/V copy
                   lambda: ops.binary_attention_packed(q, kb, ks, v),
                   lambda: sdpa_gqa(q, k, v)]
            if device == "cpu":
                fns.append(_with_env(lambda: ops.binary_attention_packed(q, kb, ks, v), "KVENGINE_BINARY_CPU_SPLIT", "0"))
                (t_sdpa, t_bin, t_gqa, t_tile), (_, speedup, _, _) = timeit_paired(fns, device, repeat=5 if quick else 15)
            else:
                fns.append(_with_env(lambda: ops.binary_attention_packed(q, kb, ks, v), "KVENGINE_BINARY_CUDA_SPLIT", "0"))
                t_sdpa, t_bin, t_gqa, t_tile = (timeit(f, device, repeat=5 if quick else 15, min_time=0.0) for f in fns)
                speedup = t_sdpa / t_bin
            if t_gqa < t_sdpa:  # the baseline is the faster SDPA form
                speedup = t_gqa / t_bin
            nbytes = v.numel() * v.element_size() + kb.numel() * 4 + ks.numel() * 4
            mine.append({
                "mode": "decode", "B": B, "Hq": Hq, "Hkv": Hkv, "L": L, "D": D, "dtype": str(dtype).replace("torch.", ""),
                "binary_packed_ms": t_bin * 1e3, "tile_path_ms": t_tile * 1e3,
                "sdpa_ms": t_sdpa * 1e3, "sdpa_gqa_ms": t_gqa * 1e3, "speedup_vs_sdpa": speedup,
                "split_vs_tile": t_tile / t_bin, "GBps": nbytes / t_bin / 1e9,
            })
            rows.append(mine[-1])
            del q, k, v, kb, ks
    print_table(f"binary attention decode on {device}: binary_attention_packed (1-bit key cache, {dtype} V) vs SDPA "
                f"({dtype} K/V), {Hq}/{Hkv} heads, one query token; speedup = SDPA time / binary time", mine,
                ["L", "D", "binary_packed_ms", "sdpa_ms", "sdpa_gqa_ms", "speedup_vs_sdpa", "GBps", "tile_path_ms",
                 "split_vs_tile"])
    return mine


def _with_env(fn, name: str, value: str):
    def call():
        with _env(name, value):
            return fn()
    return call


def _body(device: str, quick: bool) -> list[dict]:
    if device == "cpu":
        lengths = (1024,) if quick else (1024, 4096)
    else:
        lengths = (1024, 4096) if quick else (1024, 4096, 16384)
    rows = run(device, lengths=lengths, quick=quick)
    run_decode(device, contexts=(4096,) if quick else (4096, 32768), quick=quick, rows=rows)  # appended: a stop keeps both
    return rows


def main(argv=None):
    return bench_main("binary", __doc__, _body, argv)


if __name__ == "__main__":
    main()
