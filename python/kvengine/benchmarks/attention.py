"""Decode step over a quantized cache: kvengine INT2/INT4 fused attention vs (a) torch SDPA over full-precision K/V
(the faster of two exact forms, timed side by side: the GQA group's query heads as query rows, or ``enable_gqa=True``,
which on the CPU copies K/V per query head and ran 1.7-3.5x slower; ``sdpa_form`` says which) and (b)
dequantize-then-SDPA (what an unfused quantized cache does), side by side, GQA 4:1, D=128; plus the same
cache with keys quantized per token (``k_mode="per_token"``, same bytes) against the per-channel (KIVI) layout, and
(CPU) the per-channel cache with ``qk_int8`` (its packed keys scored with int8 queries) against the exact kernel.
On the CPU a second table runs SmolLM2-135M's shape (Hkv=3, GQA 3:1, D=64), the model ``kvengine eval`` uses."""
from __future__ import annotations

import torch

from kvengine import QuantizedKVCache, ops

from . import bench_main, best_sdpa_decode, print_table, randn, rows_list, sdpa_grouped, timeit


def run(device: str, contexts=(1024, 4096, 16384, 32768), batches=(1, 8), bits=(2, 4), hkv=8, g=4, D=128,
        group=32, residual=128, sinks=4, quick=False, max_fp_gb=4.0, rows=None) -> list[dict]:
    """Appends its rows to ``rows`` (default: a fresh ``rows_list()``), prints them as a table and returns the list."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    esz = torch.finfo(dtype).bits // 8
    rows = rows_list() if rows is None else rows
    first = len(rows)
    rep = 5 if quick else 11
    for B in batches:
        for N in contexts:
            fp_bytes = 2 * B * hkv * N * D * esz
            if fp_bytes / 2**30 > max_fp_gb:
                continue
            seed = 3 * (N + B)
            k = randn(B, hkv, N, D, device=device, dtype=dtype, seed=seed)
            v = randn(B, hkv, N, D, device=device, dtype=dtype, seed=seed + 1)
            q = randn(B, hkv * g, 1, D, device=device, dtype=dtype, seed=seed + 2)
            base = best_sdpa_decode(q, k, v, device, repeat=rep)  # the faster of the two exact SDPA forms
            t_sdpa = base.pop("sdpa_s")
            for nb in bits:
                cache = QuantizedKVCache(hkv, D, bits_k=nb, bits_v=nb, group_size=group, residual=residual,
                                         sinks=sinks, rotate=True, batch_size=B, dtype=dtype, device=device)
                cache.append(k, v)
                qd = cache.q

                def deq_sdpa():
                    kd = ops.dequantize(qd["k_codes"], qd["k_scale"], qd["k_zero"], nb, group, "per_channel", dtype)
                    vd = ops.dequantize(qd["v_codes"], qd["v_scale"], qd["v_zero"], nb, cache.v_group,
                                        "per_token", dtype)
                    kk = torch.cat([cache.k_fp[:, :, : cache.n_sink], kd[:, :, : cache.n_quant],
                                    cache.k_fp[:, :, cache.n_sink : cache.n_sink + cache.n_res]], 2)
                    vv = torch.cat([cache.v_fp[:, :, : cache.n_sink], vd[:, :, : cache.n_quant],
                                    cache.v_fp[:, :, cache.n_sink : cache.n_sink + cache.n_res]], 2)
                    return sdpa_grouped(ops.fwht(q), kk, vv)

                t_k = timeit(lambda: cache.attend(q), device, repeat=rep)
                t_i8 = None
                if device == "cpu":  # int8 QK (qk_int8): the same cache, the packed keys scored with int8 queries
                    cache.qk_int8 = True
                    t_i8 = timeit(lambda: cache.attend(q), device, repeat=rep)
                    cache.qk_int8 = False
                t_deq = timeit(deq_sdpa, device, repeat=max(3, rep // 2))
                ctok = QuantizedKVCache(hkv, D, bits_k=nb, bits_v=nb, group_size=group, residual=residual,
                                        sinks=sinks, rotate=True, batch_size=B, dtype=dtype, device=device,
                                        k_mode="per_token")
                ctok.append(k, v)
                t_tok = timeit(lambda: ctok.attend(q), device, repeat=rep)
                del ctok
                rows.append({
                    "Hkv": hkv, "g": g, "D": D, "B": B, "context": N, "bits": nb, "eff_bits": cache.effective_bits,
                    "kvengine_us": t_k * 1e6, "sdpa_us": t_sdpa * 1e6, "deq_sdpa_us": t_deq * 1e6,
                    "kvengine_GBps": cache.nbytes / t_k / 1e9, "sdpa_GBps": fp_bytes / t_sdpa / 1e9,
                    "speedup_vs_sdpa": t_sdpa / t_k, "speedup_vs_deq_sdpa": t_deq / t_k,
                    "ktok_us": t_tok * 1e6, "ktok_vs_kchan": t_tok / t_k,
                    "qk8_us": None if t_i8 is None else t_i8 * 1e6,
                    "qk8_speedup": None if t_i8 is None else t_k / t_i8,
                    "qk8_vs_sdpa": None if t_i8 is None else t_sdpa / t_i8, **base,
                })
                del cache
            del k, v
    print_table(f"decode attention on {device} ({dtype}, Hkv={hkv}, GQA {g}:1, D={D}, G={group}, R={residual}, "
                f"S={sinks}, rotated); speedups = baseline time / kvengine time; GB/s = bytes held / time; "
                f"ktok = keys per token (time ratio to per-channel keys); qk8 = the same cache with qk_int8 (CPU; "
                f"qk8_speedup = kvengine time / qk8 time)", rows[first:],
                ["B", "context", "bits", "eff_bits", "kvengine_us", "sdpa_us", "deq_sdpa_us", "kvengine_GBps",
                 "sdpa_GBps", "sdpa_form", "speedup_vs_sdpa", "speedup_vs_deq_sdpa", "ktok_us", "ktok_vs_kchan",
                 "qk8_us", "qk8_speedup", "qk8_vs_sdpa"])
    return rows


def _body(device: str, quick: bool) -> list[dict]:
    if device == "cpu":
        ctx = (1024, 4096) if quick else (1024, 4096, 16384, 32768)
        batches = (1,) if quick else (1, 8, 32)
    else:
        ctx = (4096, 32768) if quick else (1024, 4096, 16384, 32768, 131072)
        batches = (1, 8, 32)
    rows = run(device, contexts=ctx, batches=batches, quick=quick,
               max_fp_gb=4.0 if device == "cpu" else 40.0)
    if device == "cpu":  # SmolLM2-135M's attention shape (head_dim 64: qk_int8 was 0.6x the exact kernel here)
        run(device, contexts=(1024, 4096) if quick else (1024, 4096, 32768), batches=(1,) if quick else (1, 8),
            hkv=3, g=3, D=64, quick=quick, rows=rows)
    return rows


def main(argv=None):
    return bench_main("attention", __doc__, _body, argv)


if __name__ == "__main__":
    main()
