"""Hash-based top-k retrieval (Spotlight-style) at long context: kvengine ``hamming_topk`` (fused score + counting
select) vs the torch path (XOR + bit-trick popcount + torch.topk over the materialized score matrix), and a full
retrieval decode step (encode q + hamming_topk + sparse_decode_attention) vs full attention (SDPA, the faster of its two exact
GQA forms: benchmarks.best_sdpa_decode) over the same context; and hashing the context's keys (``hash_encode``, Spotlight MLP: on CUDA the tensor-core kernel and the
CUDA-core kernel) vs the torch composition (matmul, SiLU, matmul, sign pack); and the same selection attended over a
packed INT4 / INT2 cache (``quant_decode_attention(indices=...)``) vs ``sparse_decode_attention`` over the full-precision
K/V.  8 KV heads, 32 query heads, D = 128, 128-bit codes, k = 1024."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from kvengine import QuantizedKVCache, ops
from kvengine import reference as ref
from kvengine.retrieval import SpotlightHash

from . import bench_main, best_sdpa_decode, print_table, randn, rows_list, timeit


def torch_popcount32(x: torch.Tensor) -> torch.Tensor:
    """Popcount of int32 words with bit tricks (the masks make the arithmetic shifts harmless)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


def torch_hamming_topk(q_codes: torch.Tensor, k_codes: torch.Tensor, k: int):
    """The unfused baseline: [B, Hkv, g, N, W] XOR, popcount, group sum, torch.topk."""
    B, Hq, W = q_codes.shape
    Hkv = k_codes.shape[1]
    g = Hq // Hkv
    x = q_codes.view(B, Hkv, g, 1, W) ^ k_codes.unsqueeze(2)
    s = g * 32 * W - torch_popcount32(x).sum(dim=(2, 4))
    return torch.topk(s, k, dim=-1)


def torch_hash_encode(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """The unfused baseline in the input's precision (fp32 accumulation on CPU, cuBLAS on CUDA)."""
    u = x @ w1.to(x.dtype) + b1.to(x.dtype).unsqueeze(-2)
    f = u + F.silu(u) @ w2.to(x.dtype) + b2.to(x.dtype).unsqueeze(-2)
    return ref.pack_bits(f > 0)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _encode_cuda_core(hasher, k):
    with _env("KVENGINE_HASH_MMA", "0"):
        return hasher.encode_keys(k)


def _topk_cuda_core(qc, kc, top_k):
    with _env("KVENGINE_TOPK_MMA", "0"):
        return ops.hamming_topk(qc, kc, top_k)


def run(device: str, contexts=(32768, 131072), B=1, hkv=8, hq=32, D=128, nbits=128, top_k=1024,
        quick=False) -> list[dict]:
    dtype = torch.float32 if device == "cpu" else torch.float16
    rep = 5 if quick else 11
    rows = rows_list()
    gen = torch.Generator().manual_seed(0)
    hasher = SpotlightHash.random(hkv, D, nbits, mlp=True, generator=gen).to(device)
    for N in contexts:
        k = randn(B, hkv, N, D, device=device, dtype=dtype, seed=3 * N)
        v = randn(B, hkv, N, D, device=device, dtype=dtype, seed=3 * N + 1)
        q = randn(B, hq, 1, D, device=device, dtype=dtype, seed=3 * N + 2)
        kc = hasher.encode_keys(k)
        qc = hasher.encode_queries(q)[:, :, 0]
        # correctness spot check: same selected score multiset as the torch path
        idx, scr = ops.hamming_topk(qc, kc, top_k)
        tv, _ = torch_hamming_topk(qc, kc, top_k)
        assert torch.equal(torch.sort(scr, -1).values, torch.sort(tv.to(torch.int32), -1).values)
        t_k = timeit(lambda: ops.hamming_topk(qc, kc, top_k), device, repeat=rep)
        t_t = timeit(lambda: torch_hamming_topk(qc, kc, top_k), device, repeat=max(3, rep // 2))

        def step():
            i, _ = ops.hamming_topk(hasher.encode_queries(q), kc, top_k, keep=(4, 64))
            return ops.sparse_decode_attention(q, k, v, i)

        t_att = timeit(lambda: ops.sparse_decode_attention(q, k, v, idx), device, repeat=rep)
        t_step = timeit(step, device, repeat=rep)
        base = best_sdpa_decode(q, k, v, device, repeat=max(3, rep // 2))  # the faster exact SDPA form
        t_full = base.pop("sdpa_s")
        # hashing the context's keys (a prefill / bulk append): kvengine vs the torch composition
        w = hasher.weights("k")
        t_enc = timeit(lambda: hasher.encode_keys(k), device, repeat=rep)
        t_enc_t = timeit(lambda: torch_hash_encode(k, *w), device, repeat=max(3, rep // 2))
        enc_row = {"encode_us": t_enc * 1e6, "torch_encode_us": t_enc_t * 1e6, "encode_speedup": t_enc_t / t_enc}
        topk_row = {}
        if device != "cpu":  # the score kernel on the CUDA cores (POPC) vs the tensor cores (b1 MMA): same result
            ci, cs = _topk_cuda_core(qc, kc, top_k)
            assert torch.equal(ci, idx) and torch.equal(cs, scr)
            t_kc = timeit(lambda: _topk_cuda_core(qc, kc, top_k), device, repeat=rep)
            topk_row = {"topk_cudacore_us": t_kc * 1e6, "topk_mma_speedup": t_kc / t_k}
        if device != "cpu":  # the tensor-core kernel vs the CUDA-core kernel, same codes away from |f| ~ 0
            cc = _encode_cuda_core(hasher, k)
            agree = (cc == kc).float().mean().item()
            t_cc = timeit(lambda: _encode_cuda_core(hasher, k), device, repeat=rep)
            enc_row.update(encode_cudacore_us=t_cc * 1e6, mma_speedup=t_cc / t_enc, code_word_agreement=agree)
        # the same selection attended over a packed INT4 / INT2 cache (quant_decode_attention(indices=...))
        packed = {}
        for nb in (4, 2):
            cache = QuantizedKVCache(hkv, D, bits_k=nb, bits_v=nb, group_size=32, residual=128, sinks=4,
                                     batch_size=B, dtype=dtype, device=device)
            cache.append(k, v)
            t_p = timeit(lambda: cache.attend(q, indices=idx), device, repeat=rep)
            packed[f"sparse_int{nb}_us"] = t_p * 1e6
            packed[f"int{nb}_vs_fp"] = t_att / t_p
            del cache
        code_bytes = kc.numel() * 4
        rows.append({
            "context": N, "k": top_k, "bits": nbits,
            "topk_us": t_k * 1e6, "torch_topk_us": t_t * 1e6, "speedup_vs_torch": t_t / t_k,
            "codes_GBps": code_bytes / t_k / 1e9,
            "sparse_attn_us": t_att * 1e6, "retrieval_step_us": t_step * 1e6, "full_sdpa_us": t_full * 1e6,
            "step_speedup_vs_full": t_full / t_step, "full_sdpa_form": base.pop("sdpa_form"), **base, **topk_row,
            **enc_row, **packed,
        })
        del k, v, kc
    print_table(f"hash retrieval on {device} ({dtype} K/V, B={B}, Hkv={hkv}, Hq={hq}, D={D}, {nbits}-bit codes, "
                f"k={top_k}); speedups = baseline time / kvengine time; retrieval step = encode q + hamming_topk "
                "(keep 4 sinks + 64 recent) + sparse_decode_attention", rows,
                ["context", "topk_us", "torch_topk_us", "speedup_vs_torch", "codes_GBps", "sparse_attn_us",
                 "retrieval_step_us", "full_sdpa_us", "full_sdpa_form", "step_speedup_vs_full", "encode_us", "torch_encode_us",
                 "encode_speedup", "sparse_int4_us", "int4_vs_fp", "sparse_int2_us", "int2_vs_fp"]
                + (["topk_cudacore_us", "topk_mma_speedup", "encode_cudacore_us", "mma_speedup", "code_word_agreement"]
                   if device != "cpu" else []))
    return rows


def _body(device: str, quick: bool) -> list[dict]:
    if device == "cpu":
        ctx = (32768,) if quick else (32768, 131072)
    else:
        ctx = (32768, 131072) if quick else (32768, 131072, 524288)
    return run(device, contexts=ctx, quick=quick)


def main(argv=None):
    return bench_main("retrieval", __doc__, _body, argv)


if __name__ == "__main__":
    main()
