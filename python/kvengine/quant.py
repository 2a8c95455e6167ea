"""Self-describing quantized tensors: ``kvengine.quantize_pack(x, ...)`` → ``QuantizedTensor``;
``kvengine.dequantize(q)`` needs nothing else."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import ops


@dataclass(frozen=True)
class QuantizedTensor:
    codes: Tensor  # uint8 [..., T, D*bits/8], codes packed along D, first element in the lowest bits
    scale: Tensor  # [..., T/G, D] (per_channel) or [..., T, D/G] (per_token)
    zero: Tensor
    bits: int
    group_size: int
    mode: str
    shape: tuple  # the original [..., T, D]
    dtype: torch.dtype  # the original dtype
    rotated: bool = False  # codes hold fwht(x[..., perm]) * rot_scale
    rot_scale: Optional[float] = None
    perm: Optional[Tensor] = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    @property
    def effective_bits(self) -> float:
        n = 1
        for s in self.shape:
            n *= s
        return self.nbytes * 8 / n


def quantize_pack(
    x: Tensor, bits: int = 2, group_size: int = 32, mode: str = "per_channel", meta_dtype: Optional[torch.dtype] = None,
    clip: int = 0,
) -> QuantizedTensor:
    """Quantize x [..., T, D] (see README: semantics, packing order); ``clip`` > 1: MSE range search over that many
    candidate ranges per group (``ops.quantize_pack``)."""
    c, s, z = ops.quantize_pack(x, bits, group_size, mode, meta_dtype, clip)
    return QuantizedTensor(c, s, z, bits, group_size, mode, tuple(x.shape), x.dtype)


def rotate_quantize_pack(
    x: Tensor,
    bits: int = 2,
    group_size: int = 32,
    mode: str = "per_channel",
    scale: Optional[float] = None,
    perm: Optional[Tensor] = None,
    meta_dtype: Optional[torch.dtype] = None,
    clip: int = 0,
) -> QuantizedTensor:
    """FWHT-rotate the last dim (optional channel permutation first), then quantize, in one fused pass."""
    c, s, z = ops.rotate_quantize_pack(x, bits, group_size, mode, scale, perm, meta_dtype, clip)
    return QuantizedTensor(c, s, z, bits, group_size, mode, tuple(x.shape), x.dtype, True, scale, perm)


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None, unrotate: bool = True) -> Tensor:
    """Back to full precision. A rotated tensor is rotated back (``unrotate=False`` keeps the rotated space)."""
    dtype = dtype or q.dtype
    if not q.rotated or not unrotate:
        return ops.dequantize(q.codes, q.scale, q.zero, q.bits, q.group_size, q.mode, dtype)
    y = ops.dequantize(q.codes, q.scale, q.zero, q.bits, q.group_size, q.mode, torch.float32)
    n = y.shape[-1]
    s = q.rot_scale if q.rot_scale is not None else ops.default_scale(n)
    y = ops.fwht(y, 1.0 / (n * s))  # H·H = n·I
    if q.perm is not None:
        out = torch.empty_like(y)
        out[..., q.perm.long()] = y
        y = out
    return y.to(dtype)
