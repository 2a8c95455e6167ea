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


def quantize(x: Tensor, bits: int, group_size: int, mode: str, meta_dtype=None):
    """Unpacked codes (uint8 [..., T, D]) + scale + zero."""
    md = meta_dtype or x.dtype
    qmax = float(2**bits - 1)
    xg, ax = _groups(x.float(), group_size, mode)
    lo, hi = xg.amin(ax, keepdim=True), xg.amax(ax, keepdim=True)
    scale = ((hi - lo) / qmax).to(md)
    zero = lo.to(md)
    s, z = scale.float(), zero.float()
    code = torch.floor((xg - z) / s + 0.5).clamp(0, qmax)
    code = torch.where((s == 0) | torch.isnan(code), torch.zeros_like(code), code)
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


def quantize_pack(x: Tensor, bits: int, group_size: int, mode: str, meta_dtype=None):
    c, s, z = quantize(x, bits, group_size, mode, meta_dtype)
    return pack(c, bits), s, z


def rotate_quantize_pack(x, bits, group_size, mode, scale=None, perm=None, meta_dtype=None):
    return quantize_pack(fwht(x, scale, perm), bits, group_size, mode, meta_dtype)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, mode: str, dtype) -> Tensor:
    c = unpack(codes, bits).float()
    cg, ax = _groups(c, group_size, mode)
    y = cg * scale.float().unsqueeze(ax) + zero.float().unsqueeze(ax)
    return y.reshape(c.shape).to(dtype)


def gather_kv(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k, bits_v, k_group,
              v_group, b: int, dtype=torch.float64):
    """Keys and values of sequence b in time order (sinks, quantized, residual), dequantized: [Hkv, N, D] each."""
    ns, nq, nr = (int(v) for v in lens[b].tolist())
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


def quant_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k, bits_v,
                           k_group, v_group, softmax_scale=None, rotate_k=False, rotate_v=False, k_perm=None,
                           v_perm=None):
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
                         k_group, v_group, b)
        N = K.shape[1]
        K = K.repeat_interleave(g, dim=0)
        V = V.repeat_interleave(g, dim=0)
        s = (qd[b] @ K.transpose(-1, -2)) * scale  # [Hq, Tq, N]
        pos = torch.arange(N, device=q.device)
        lim = N - Tq + torch.arange(Tq, device=q.device)
        s = s.masked_fill(pos[None, None, :] > lim[None, :, None], float("-inf"))
        out[b] = torch.softmax(s, dim=-1) @ V
    if rotate_v:
        out = fwht(out)
        if v_perm is not None:
            out = out[..., torch.argsort(v_perm.long())]
    return out.to(q.dtype)
