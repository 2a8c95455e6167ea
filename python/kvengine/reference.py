"""Pure-PyTorch reference of every kvengine op — the test oracle.  Slow and simple on purpose.

Same semantics as the kernels (see README.md).  Quantization uses exactly the kernels' fp32 formula, so codes are
bit-identical for identical inputs; fwht is computed in float64 (the kernels use fp32).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor


@lru_cache(maxsize=32)
def _hadamard_cpu(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int, dtype=torch.float64, device="cpu") -> Tensor:
    """Sylvester-ordered Hadamard matrix H_n (entries ±1)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n must be a power of two, got {n}")
    return _hadamard_cpu(n).to(dtype=dtype, device=device)


def fwht(x: Tensor, scale: Optional[float] = None, perm: Optional[Tensor] = None) -> Tensor:
    n = x.shape[-1]
    s = 1.0 / math.sqrt(n) if scale is None else scale
    xd = x.double()
    if perm is not None:
        xd = xd[..., perm.long()]
    if n <= 256:
        return ((xd @ hadamard(n, device=x.device)) * s).to(x.dtype)
    # O(n log n) butterflies in float64 (the dense matrix would be n² doubles)
    lead = xd.shape[:-1]
    y = xd.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return (y.reshape(*lead, n) * s).to(x.dtype)


def _groups(xf: Tensor, group_size: int, mode: str) -> Tensor:
    *lead, T, D = xf.shape
    if mode == "per_channel":
        return xf.reshape(*lead, T // group_size, group_size, D), -2
    return xf.reshape(*lead, T, D // group_size, group_size), -1


def _codes(xg: Tensor, s: Tensor, z: Tensor, qmax: float) -> Tensor:
    code = torch.floor((xg - z) / s + 0.5).clamp(0, qmax)
    return torch.where((s == 0) | torch.isnan(code), torch.zeros_like(code), code)


def quantize(x: Tensor, bits: int, group_size: int, mode: str, meta_dtype=None, clip: int = 0):
    """Unpacked codes (uint8 [..., T, D]) + scale + zero.

    Per group: lo/hi = min/max (fp32); scale = round_meta((hi − lo)/(2^bits − 1)), zero = round_meta(lo), codes from
    the rounded values.  ``clip`` = n > 1: candidates c = 1 … n−1 move both ends in by a·w (a = fp32(0.025)·c,
    w = hi − lo, all fp32), and the candidate (c = 0 being min/max) with the smallest Σ (code·scale + zero − x)²
    over the group wins, ties to the lower c; a group whose min/max error is not finite keeps min/max."""
    md = meta_dtype or x.dtype
    qmax = float(2**bits - 1)
    xg, ax = _groups(x.float(), group_size, mode)
    lo, hi = xg.amin(ax, keepdim=True), xg.amax(ax, keepdim=True)
    scale = ((hi - lo) / qmax).to(md)
    zero = lo.to(md)
    s, z = scale.float(), zero.float()
    code = _codes(xg, s, z, qmax)
    if clip > 1:
        def sse(c, s, z):
            return ((c * s + z - xg) ** 2).sum(ax, keepdim=True)

        best = sse(code, s, z)
        keep = ~torch.isfinite(best)
        w = hi - lo
        for c in range(1, clip):
            aw = torch.tensor(0.025, dtype=torch.float32) * float(c) * w
            lc, hc = lo + aw, hi - aw
            sc_c, z_c = ((hc - lc) / qmax).to(md), lc.to(md)
            cd = _codes(xg, sc_c.float(), z_c.float(), qmax)
            e = sse(cd, sc_c.float(), z_c.float())
            better = (e < best) & ~keep
            best = torch.where(better, e, best)
            scale, zero = torch.where(better, sc_c, scale), torch.where(better, z_c, zero)
            code = torch.where(better, cd, code)
    return code.to(torch.uint8).reshape(x.shape), scale.squeeze(ax), zero.squeeze(ax)


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., D] → [..., D*bits/8], first element in the lowest bits."""
    if bits == 8:
        return codes.clone()
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return packed.clone()
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def quantize_pack(x: Tensor, bits: int, group_size: int, mode: str, meta_dtype=None, clip: int = 0):
    c, s, z = quantize(x, bits, group_size, mode, meta_dtype, clip)
    return pack(c, bits), s, z


def rotate_quantize_pack(x, bits, group_size, mode, scale=None, perm=None, meta_dtype=None, clip: int = 0):
    return quantize_pack(fwht(x, scale, perm), bits, group_size, mode, meta_dtype, clip)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, mode: str, dtype) -> Tensor:
    c = unpack(codes, bits).float()
    cg, ax = _groups(c, group_size, mode)
    y = cg * scale.float().unsqueeze(ax) + zero.float().unsqueeze(ax)
    return y.reshape(c.shape).to(dtype)


def gather_kv(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k, bits_v, k_group,
              v_group, b: int, dtype=torch.float64, k_mode: str = "per_channel"):
    """Keys and values of sequence b in time order (sinks, quantized, residual), dequantized: [Hkv, N, D] each.
    ``k_mode``: keys per-channel (groups of ``k_group`` tokens) or per-token (groups of ``k_group`` channels)."""
    ns, nq, nr = (int(v) for v in lens[b].tolist())
    if k_mode == "per_token":
        kq = dequantize(k_codes[b : b + 1, :, :nq], k_scale[b : b + 1, :, :nq], k_zero[b : b + 1, :, :nq], bits_k,
                        k_group, "per_token", dtype)[0]
    else:
        kq = _dequant_partial_k(k_codes, k_scale, k_zero, bits_k, k_group, b, nq, dtype)
    vq = dequantize(v_codes[b : b + 1, :, :nq], v_scale[b : b + 1, :, :nq], v_zero[b : b + 1, :, :nq], bits_v, v_group,
                    "per_token", dtype)[0]
    K = torch.cat([k_fp[b, :, :ns].to(dtype), kq, k_fp[b, :, ns : ns + nr].to(dtype)], dim=1)
    V = torch.cat([v_fp[b, :, :ns].to(dtype), vq, v_fp[b, :, ns : ns + nr].to(dtype)], dim=1)
    return K, V


def _dequant_partial_k(k_codes, k_scale, k_zero, bits_k, k_group, b, nq, dtype):
    if nq == 0:
        return torch.zeros(k_codes.shape[1], 0, k_scale.shape[-1], dtype=dtype, device=k_codes.device)
    ng = -(-nq // k_group)
    full = dequantize(k_codes[b : b + 1, :, : ng * k_group], k_scale[b : b + 1, :, :ng], k_zero[b : b + 1, :, :ng],
                      bits_k, k_group, "per_channel", dtype)[0]
    return full[:, :nq]


def int8_qk_scores(q, k_codes, k_scale, k_zero, bits_k, k_group, b, nq, softmax_scale):
    """The scores of sequence b's packed keys under ``qk_int8`` [Hq, Tq, nq] (float64): per key group and query row,
    q' = (q·softmax_scale)·k_scale in fp32, q8 = round(q'·(127 / max|q'|)), and score = max|q'| / 127 ·
    (q8 · (codes − m)) + (q·softmax_scale) · (k_zero + m·k_scale), m = (2^bits_k − 1) / 2.  q: the (rotated) queries of sequence b [Hq, Tq, D]; softmax_scale: an fp32
    scalar tensor (the kernel's).  ``q`` is rounded to fp32 first, so with ``rotate_k`` the kernel's own fp32
    rotation may round an element of q8 the other way."""
    Hq, Tq, D = q.shape
    Hkv = k_codes.shape[1]
    g = Hq // Hkv
    if nq == 0:
        return torch.zeros(Hq, Tq, 0, dtype=torch.float64, device=q.device)
    ng = -(-nq // k_group)
    qs = q.float() * softmax_scale.float()
    codes = unpack(k_codes[b, :, : ng * k_group], bits_k).double()  # [Hkv, ng·G, D]
    codes = codes.reshape(Hkv, ng, k_group, D).repeat_interleave(g, 0)  # [Hq, ng, G, D]
    ks = k_scale[b, :, :ng].float().repeat_interleave(g, 0)  # [Hq, ng, D]
    kz = k_zero[b, :, :ng].float().repeat_interleave(g, 0)
    qp = qs[:, None] * ks[:, :, None]  # [Hq, ng, Tq, D] fp32
    amax = qp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(amax))
    q8 = torch.round(qp * inv).clamp(-127, 127).double()
    mid = (2**bits_k - 1) / 2  # centered codes
    dots = q8 @ (codes - mid).transpose(-1, -2)  # [Hq, ng, Tq, G]
    kzm = kz.double() + mid * ks.double()
    bias = (qs.double()[:, None] * kzm[:, :, None]).sum(-1, keepdim=True)  # [Hq, ng, Tq, 1]
    s = (amax / 127).double() * dots + bias
    return s.permute(0, 2, 1, 3).reshape(Hq, Tq, ng * k_group)[..., :nq]


def quant_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k, bits_v,
                           k_group, v_group, softmax_scale=None, rotate_k=False, rotate_v=False, k_perm=None,
                           v_perm=None, k_mode="per_channel", indices=None, qk_int8=False):
    B, Hq, Tq, D = q.shape
    Hkv = k_codes.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qd = q.double()
    if rotate_k:
        qd = fwht(qd, None, k_perm)
    out = torch.empty(B, Hq, Tq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        K, V = gather_kv(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k, bits_v,
                         k_group, v_group, b, k_mode=k_mode)
        N = K.shape[1]
        if indices is not None:  # sparse: the selected valid positions of each KV head (duplicates kept)
            for h in range(Hkv):
                ix = indices[b, h].long()
                ix = ix[(ix >= 0) & (ix < N)]
                for hl in range(g):
                    hq = h * g + hl
                    if ix.numel() == 0:
                        out[b, hq] = 0
                        continue
                    s = (qd[b, hq] @ K[h, ix].T) * scale  # [1, n]
                    out[b, hq] = torch.softmax(s, -1) @ V[h, ix]
            continue
        K = K.repeat_interleave(g, dim=0)
        V = V.repeat_interleave(g, dim=0)
        s = (qd[b] @ K.transpose(-1, -2)) * scale  # [Hq, Tq, N]
        if qk_int8 and bits_k <= 4 and k_mode == "per_channel":  # the packed keys' scores from int8 queries
            ns, nq = int(lens[b, 0]), int(lens[b, 1])
            # the kernel's fp32 scale: 1 / sqrt(D) rounded as fp32 operations, or the given one rounded to fp32
            s32 = (torch.tensor(1.0) / torch.tensor(float(D)).sqrt() if softmax_scale is None
                   else torch.tensor(softmax_scale, dtype=torch.float32))
            s[..., ns : ns + nq] = int8_qk_scores(qd[b].to(q.dtype), k_codes, k_scale, k_zero, bits_k, k_group, b,
                                                  nq, s32)
        pos = torch.arange(N, device=q.device)
        lim = N - Tq + torch.arange(Tq, device=q.device)
        s = s.masked_fill(pos[None, None, :] > lim[None, :, None], float("-inf"))
        out[b] = torch.softmax(s, dim=-1) @ V
    if rotate_v:
        out = fwht(out)
        if v_perm is not None:
            out = out[..., torch.argsort(v_perm.long())]
    return out.to(q.dtype)


# ---- 1-bit QK attention (BinaryAttention) ---------------------------------------------------------------------------
class _SignSTE(torch.autograd.Function):
    """sign(x) ∈ {−1, +1} (sign(0) = +1) forward; straight-through backward: grad · 1[|x| ≤ 1]."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x < 0, -1.0, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def sign_ste(x: Tensor) -> Tensor:
    return _SignSTE.apply(x)


def center_tokens(x: Tensor) -> Tensor:
    """x − mean over the token axis (dim −2), per channel: the mean is an fp64 sum divided by L, rounded to fp32, and
    subtracted in fp32 (so the signs are reproducible bit for bit).  x is fp32."""
    return x - (x.double().sum(-2, keepdim=True) / x.shape[-2]).float()


def sign_pack(x: Tensor, center: bool = False):
    """(bits int32 [..., L, D/32], scale fp32 [..., L]): bit j of word w is 1 iff x[..., 32w + j] < 0 (after centering);
    scale = mean |x| over D."""
    xf = x.float()
    if center:
        xf = center_tokens(xf)
    D = xf.shape[-1]
    neg = (xf < 0).to(torch.int64).reshape(*xf.shape[:-1], D // 32, 32)
    words = (neg << torch.arange(32, device=x.device, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words, xf.abs().mean(-1)


def unpack_signs(bits: Tensor, dtype=torch.float32) -> Tensor:
    """±1 [..., 32·W] from sign words [..., W] (bit set = −1)."""
    b = ((bits.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> torch.arange(32, device=bits.device)) & 1
    return (1 - 2 * b).reshape(*bits.shape[:-1], bits.shape[-1] * 32).to(dtype)


def rel_bias_dense(rel_bias: Tensor, Lq: int, Lk: int) -> Tensor:
    """[H, Lq, Lk] dense bias of a relative-position table [H, 2R − 1]: element (i, j) is
    rel_bias[h, (R − 1) + (i + Lk − Lq) − j]  (with Lq = Lk = L and R = L: i − j + L − 1)."""
    T = rel_bias.shape[-1]
    c = (T - 1) // 2
    i = torch.arange(Lq, device=rel_bias.device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=rel_bias.device)[None, :]
    return rel_bias[:, c + i - j]


def _binary_attention_core(qs, alpha, ks, beta, v, bias, rel_bias, causal, softmax_scale):
    B, Hq, Lq, D = qs.shape
    Hkv, Lk = ks.shape[1], ks.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    ks, beta, vf = ks.repeat_interleave(g, 1), beta.repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = scale * alpha[..., :, None] * beta[..., None, :] * (qs @ ks.transpose(-1, -2))
    if bias is not None:
        s = s + (bias.float() if bias.dim() == 4 else bias.float()[None])
    if rel_bias is not None:
        s = s + rel_bias_dense(rel_bias.float(), Lq, Lk)[None]
    if causal:
        i = torch.arange(Lq, device=s.device)[:, None] + (Lk - Lq)
        j = torch.arange(Lk, device=s.device)[None, :]
        s = s.masked_fill(j > i, float("-inf"))
    dead = torch.isneginf(s.amax(-1, keepdim=True))  # rows with no visible key -> output 0
    p = torch.softmax(torch.where(dead, torch.zeros_like(s), s), dim=-1) * (~dead)
    return (p @ vf).to(v.dtype)


def binary_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, rel_bias: Optional[Tensor] = None,
                     causal: bool = False, center_k: bool = True, softmax_scale: Optional[float] = None) -> Tensor:
    """Dense fp32 oracle of kvengine.binary_attention (differentiable: straight-through sign, see sign_ste).

    score[i, j] = softmax_scale · α_i · β_j · (sign(q_i) · sign(k_j)) + bias[i, j] + rel[i − j]; α = mean|q|,
    β = mean|k| of the (centered) keys; causal: j ≤ i + Lk − Lq.
    """
    qf, kf = q.float(), k.float()
    if center_k:
        kf = center_tokens(kf)
    return _binary_attention_core(sign_ste(qf), qf.abs().mean(-1), sign_ste(kf), kf.abs().mean(-1), v, bias, rel_bias,
                                  causal, softmax_scale)


def binary_attention_packed(q: Tensor, k_bits: Tensor, k_scale: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                            rel_bias: Optional[Tensor] = None, causal: bool = False,
                            softmax_scale: Optional[float] = None) -> Tensor:
    """binary_attention over keys already packed by sign_pack (k_bits [B, Hkv, Lk, D/32], k_scale [B, Hkv, Lk])."""
    qf = q.float()
    return _binary_attention_core(sign_ste(qf), qf.abs().mean(-1), unpack_signs(k_bits), k_scale.float(), v, bias,
                                  rel_bias, causal, softmax_scale)


# ---- hash-based top-k KV retrieval (Spotlight Attention) -------------------------------------------------------------
def hash_project(x: Tensor, w1: Tensor, b1=None, w2=None, b2=None) -> Tensor:
    """The real-valued hash f(x) in float64: u = x @ w1 + b1; f = u or u + silu(u) @ w2 + b2 (shared or per-head
    weights, see ops.hash_encode)."""
    per_head = w1.dim() == 3
    u = x.double() @ w1.double()
    if b1 is not None:
        u = u + (b1.double().unsqueeze(-2) if per_head else b1.double())
    if w2 is None:
        return u
    f = u + torch.nn.functional.silu(u) @ w2.double()
    if b2 is not None:
        f = f + (b2.double().unsqueeze(-2) if per_head else b2.double())
    return f


def pack_bits(bits: Tensor) -> Tensor:
    """bool/0-1 [..., 32·W] -> int32 [..., W] (bit j of word w = element 32w + j)."""
    b = bits.to(torch.int64).reshape(*bits.shape[:-1], bits.shape[-1] // 32, 32)
    words = (b << torch.arange(32, device=bits.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def hash_encode(x: Tensor, w1: Tensor, b1=None, w2=None, b2=None, nbits=None) -> Tensor:
    return pack_bits(hash_project(x, w1, b1, w2, b2) > 0)


def popcount32(x: Tensor) -> Tensor:
    """Per-element popcount of int32/int64 words (low 32 bits) by bit tricks."""
    v = x.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def hamming_scores(q_codes: Tensor, k_codes: Tensor) -> Tensor:
    """[B, Hkv, N] int64: Σ over each GQA group of (nbits − popcount(q ^ k))."""
    q = q_codes.squeeze(2) if q_codes.dim() == 4 else q_codes
    B, Hq, W = q.shape
    Hkv = k_codes.shape[1]
    g = Hq // Hkv
    qg = q.reshape(B, Hkv, g, 1, W)
    pc = popcount32(qg ^ k_codes.unsqueeze(2)).sum(-1)  # [B, Hkv, g, N]
    return (g * 32 * W - pc.sum(2)).to(torch.int64)


def hamming_topk(q_codes: Tensor, k_codes: Tensor, k: int, seq_lens=None, keep=None):
    """Brute force: all scores, stable sort by descending score (ties: lower position first), kept positions first,
    then ascending positions, -1 padding."""
    s = hamming_scores(q_codes, k_codes).cpu()
    B, Hkv, N = s.shape
    sinks, recent = keep if keep is not None else (0, 0)
    idx = torch.full((B, Hkv, k), -1, dtype=torch.int32)
    scr = torch.full((B, Hkv, k), -1, dtype=torch.int32)
    for b in range(B):
        L = N if seq_lens is None else int(seq_lens[b])
        ns = min(sinks, L)
        nr = min(recent, L - ns)
        m = max(0, min(k - ns - nr, L - ns - nr))
        for h in range(Hkv):
            mid = s[b, h, ns:L - nr]
            order = torch.sort(-mid, stable=True).indices[:m] + ns
            sel = torch.cat([torch.arange(ns), torch.sort(order).values, torch.arange(L - nr, L)]).long()
            idx[b, h, :sel.numel()] = sel.to(torch.int32)
            scr[b, h, :sel.numel()] = s[b, h, sel].to(torch.int32)
    return idx.to(q_codes.device), scr.to(q_codes.device)


def sparse_decode_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, seq_lens=None, softmax_scale=None):
    """SDPA over the gathered valid tokens of each (b, KV head), float64."""
    B, Hq, _, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    out = torch.zeros(B, Hq, 1, D, dtype=torch.float64)
    for b in range(B):
        L = N if seq_lens is None else int(seq_lens[b])
        for h in range(Hkv):
            ii = indices[b, h].long().cpu()
            ii = ii[(ii >= 0) & (ii < L)]
            if ii.numel() == 0:
                continue
            kk, vv = k[b, h].cpu().double()[ii], v[b, h].cpu().double()[ii]
            qq = q[b, h * g:(h + 1) * g, 0].cpu().double()
            p = torch.softmax(scale * qq @ kk.T, -1)
            out[b, h * g:(h + 1) * g, 0] = p @ vv
    return out.to(q.dtype)
