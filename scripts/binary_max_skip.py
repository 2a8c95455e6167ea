"""How often the tensor-core binary_attention kernel may skip its per-tile row max (a CPU simulation of the rule).

The kernel (cuda/src/binary_attention.cu, no bias) keeps a lazy running max m per query row (moved only when a
tile's max exceeds it by more than 15 log2 units) and skips computing a 16-row x 64-key tile's max when, for every
row i of the warp, mul_i · D · max_j β_j <= m_i + 15 (mul_i = α_i · |scale| · log2 e, β_j = mean |k_j| of the
centered key).  This replays that rule on real attention inputs, all-MiniLM-L6-v2 over Wikipedia summaries (q / k
captured at every layer through transformers' attention interface), and on the N(0, 1) data of `bench binary`, and
prints the fraction of tiles after a warp's first that skip.

    .venv/bin/python scripts/binary_max_skip.py [--texts 64]
"""
from __future__ import annotations

import argparse
import math

import torch

LOG2E = 1.0 / math.log(2.0)


def skip_stats(q: torch.Tensor, k: torch.Tensor, scale: float, slack: float = 15.0, bq: int = 16, bk: int = 64):
    """q [H, L, D], k [H, Lk, D] (one sequence): (tiles after each warp's first, of which skipped)."""
    H, L, D = q.shape
    kc = k - k.mean(1, keepdim=True)
    alpha = q.abs().mean(-1)  # [H, L]
    beta = kc.abs().mean(-1)  # [H, Lk]
    sq = torch.where(q >= 0, 1.0, -1.0)
    sk = torch.where(kc >= 0, 1.0, -1.0)
    n = sq @ sk.transpose(1, 2)  # [H, L, Lk]: D - 2 popc
    mul = alpha * abs(scale) * LOG2E
    x = mul[..., None] * beta[:, None, :] * n  # the exponent's argument before -m
    lk = k.shape[1]
    total = skipped = 0
    for h in range(H):
        for r0 in range(0, L, bq):
            rows = slice(r0, min(L, r0 + bq))
            m = torch.full((rows.stop - rows.start,), -math.inf)
            for t, j0 in enumerate(range(0, lk, bk)):
                cols = slice(j0, min(lk, j0 + bk))
                bound = mul[h, rows] * D * beta[h, cols].max()
                need = bool((bound > m + slack).any())
                if t > 0:
                    total += 1
                    skipped += not need
                if need:
                    mt = x[h, rows, cols].max(1).values
                    m = torch.where(mt > m + slack, mt, m)
    return total, skipped


def minilm(n_texts: int):
    from kvengine.integrations import binary
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = []

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        seen.append((query.detach(), key.detach(), scaling))
        return binary.fake_quant_forward(module, query, key, value, attention_mask, scaling=scaling)

    AttentionInterface.register("kve_capture", capture)
    AttentionMaskInterface.register("kve_capture", sdpa_mask)
    model, tok = binary.load_minilm()
    model.set_attn_implementation("kve_capture")
    texts = [e for _, e in binary.load_summaries(n_texts)]
    total = skipped = 0
    with torch.no_grad():
        for t in texts:  # one text per forward: no padding, every key real
            enc = tok([t], truncation=True, max_length=256, return_tensors="pt")
            seen.clear()
            model(**enc)
            for q, k, s in seen:
                a, b = skip_stats(q[0].float(), k[0].float(), s if s is not None else q.shape[-1] ** -0.5)
                total += a
                skipped += b
    return total, skipped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=64)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    print("data                                  tiles after the first  skipped  fraction")
    for D in (32, 64, 128):
        q, k = torch.randn(2, 4, 1024, D, generator=g).unbind(0)
        a, b = skip_stats(q, k, D ** -0.5)
        print(f"N(0,1) q/k, L = 1024, D = {D:<3}            {a:>8}  {b:>7}  {b / max(a, 1):.3f}")
    a, b = minilm(args.texts)
    print(f"all-MiniLM-L6-v2, {args.texts} Wikipedia texts, 6 layers  {a:>8}  {b:>7}  {b / max(a, 1):.3f}")


if __name__ == "__main__":
    main()
