"""Typed wrappers of ``torch.ops.kvengine.*``, their fake (meta) implementations, and autograd registrations.

One function per op, same name as the op in every layer (cpp/, cuda/, the binding, tests/, bench/).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.kvengine

MODES = ("per_channel", "per_token")
BITS = (1, 2, 4, 8)


# ---- fwht -------------------------------------------------------------------------------------------------------
def fwht(x: Tensor, scale: Optional[float] = None, perm: Optional[Tensor] = None) -> Tensor:
    """Normalized fast Walsh–Hadamard transform over the last dim: ``y = x[..., perm] @ H_n * scale``.

    ``H_n`` is the Sylvester-ordered Hadamard matrix, n a power of two in [2, 32768], default scale ``1/sqrt(n)``
    (then ``fwht(fwht(x)) == x``).  fp32/fp16/bf16 with fp32 arithmetic.  Differentiable.
    """
    return _ops.fwht(x, scale, perm)


def fwht_(x: Tensor, scale: Optional[float] = None, perm: Optional[Tensor] = None) -> Tensor:
    """In-place fwht (no allocation; not differentiable).  Returns x."""
    _ops.fwht_(x, scale, perm)
    return x


@torch.library.register_fake("kvengine::fwht_")
def _fwht__fake(x, scale=None, perm=None):
    return None


@torch.library.register_fake("kvengine::fwht")
def _fwht_fake(x, scale=None, perm=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fwht_setup(ctx, inputs, output):
    _, scale, perm = inputs
    ctx.scale = scale
    ctx.save_for_backward(perm if perm is not None else None)


def _fwht_backward(ctx, grad):
    (perm,) = ctx.saved_tensors
    # y = P(x) H s with H symmetric: dL/dx = P^T (H s dL/dy)
    g = _ops.fwht(grad.contiguous(), ctx.scale, None)
    if perm is not None:
        gx = torch.empty_like(g)
        gx[..., perm.long()] = g
        g = gx
    return g, None, None


torch.library.register_autograd("kvengine::fwht", _fwht_backward, setup_context=_fwht_setup)


def rotate(x: Tensor, group: int = 1, perm: Optional[Tensor] = None) -> Tensor:
    """Grouped-head rotation (RotateKV): x [..., H, D] viewed as [..., H/group, group*D] and transformed by fwht.

    ``group=1`` rotates each head on its own.  The inverse is ``rotate`` again with the inverse permutation applied
    after (the normalized transform is its own inverse).
    """
    H, D = x.shape[-2], x.shape[-1]
    if group < 1 or H % group != 0:
        raise ValueError(f"kvengine.rotate: group ({group}) must divide the head dim (dim -2, size {H})")
    y = fwht(x.reshape(*x.shape[:-2], H // group, group * D), None, perm)
    return y.reshape(x.shape)


# ---- quantize_pack / rotate_quantize_pack / dequantize ---------------------------------------------------------------
def _meta_shape(shape, bits, group_size, mode):
    *lead, T, D = shape
    if mode == "per_channel":
        return (*lead, T // group_size, D)
    return (*lead, T, D // group_size)


def quantize_pack(
    x: Tensor, bits: int, group_size: int, mode: str, meta_dtype: Optional[torch.dtype] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min–max group quantization + dense bit-packing.  Returns (codes uint8, scale, zero)."""
    return _ops.quantize_pack(x, bits, group_size, mode, meta_dtype)


def rotate_quantize_pack(
    x: Tensor,
    bits: int,
    group_size: int,
    mode: str,
    scale: Optional[float] = None,
    perm: Optional[Tensor] = None,
    meta_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """fwht(x, scale, perm) fused with quantize_pack in one pass; equals the composition exactly."""
    return _ops.rotate_quantize_pack(x, bits, group_size, mode, scale, perm, meta_dtype)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, mode: str, dtype: torch.dtype
) -> Tensor:
    """x̂ = code · scale + zero, unpacked to [..., T, D] in ``dtype``."""
    return _ops.dequantize(codes, scale, zero, bits, group_size, mode, dtype)


def _quant_fake(x, bits, group_size, mode, meta_dtype=None):
    *lead, T, D = x.shape
    md = meta_dtype if meta_dtype is not None else x.dtype
    codes = x.new_empty((*lead, T, D * bits // 8), dtype=torch.uint8)
    ms = _meta_shape(x.shape, bits, group_size, mode)
    return codes, x.new_empty(ms, dtype=md), x.new_empty(ms, dtype=md)


@torch.library.register_fake("kvengine::quantize_pack")
def _quantize_pack_fake(x, bits, group_size, mode, meta_dtype=None):
    return _quant_fake(x, bits, group_size, mode, meta_dtype)


@torch.library.register_fake("kvengine::rotate_quantize_pack")
def _rotate_quantize_pack_fake(x, bits, group_size, mode, scale=None, perm=None, meta_dtype=None):
    return _quant_fake(x, bits, group_size, mode, meta_dtype)


@torch.library.register_fake("kvengine::dequantize")
def _dequantize_fake(codes, scale, zero, bits, group_size, mode, dtype):
    *lead, T, nb = codes.shape
    return codes.new_empty((*lead, T, nb * 8 // bits), dtype=dtype)


def default_scale(n: int) -> float:
    return 1.0 / math.sqrt(n)


# ---- quant_decode_attention ------------------------------------------------------------------------------------------
def quant_decode_attention(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_zero: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_zero: Tensor,
    k_fp: Tensor,
    v_fp: Tensor,
    lens: Tensor,
    bits_k: int,
    bits_v: int,
    k_group: int,
    v_group: int,
    softmax_scale: Optional[float] = None,
    rotate_k: bool = False,
    rotate_v: bool = False,
    k_perm: Optional[Tensor] = None,
    v_perm: Optional[Tensor] = None,
) -> Tensor:
    """Exact softmax attention of q [B, Hq, Tq, D] over a quantized KV cache, in one fused pass over the packed data.

    Per sequence b (``lens[b] = (n_sink, n_quant, n_res)``) the keys/values are, in time order: ``n_sink`` full-
    precision sinks (``k_fp/v_fp[b, :, :n_sink]``), ``n_quant`` packed tokens (keys per-channel in groups of
    ``k_group`` tokens, values per-token in groups of ``v_group`` channels), and ``n_res`` full-precision recent tokens
    (``k_fp/v_fp[b, :, n_sink:n_sink+n_res]``).  The Tq queries are the newest Tq tokens (causal among themselves).
    With ``rotate_k`` the cache holds fwht(k[..., k_perm]) and q is rotated the same way; with ``rotate_v`` the
    values are rotated and the output is rotated back.  See ``QuantizedKVCache`` for the usual way to build these.
    """
    return _ops.quant_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k,
                                       bits_v, k_group, v_group, softmax_scale, rotate_k, rotate_v, k_perm, v_perm)


@torch.library.register_fake("kvengine::quant_decode_attention")
def _quant_decode_attention_fake(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k,
                                 bits_v, k_group, v_group, softmax_scale=None, rotate_k=False, rotate_v=False,
                                 k_perm=None, v_perm=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
