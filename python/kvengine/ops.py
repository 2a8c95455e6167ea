"""Typed wrappers of ``torch.ops.kvengine.*``, their fake (meta) implementations, and autograd registrations.

One function per op, same name as the op in every layer (cpp/, cuda/, the binding, tests/, bench/).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.kvengine

_FAKES: dict = {}     # op name -> fake (meta) implementation
_AUTOGRAD: dict = {}  # op name -> (backward, setup_context)


def _fake(name: str):
    def deco(fn):
        _FAKES[name] = fn
        torch.library.register_fake(f"kvengine::{name}")(fn)
        return fn
    return deco


def _autograd(name: str, backward, setup_context) -> None:
    _AUTOGRAD[name] = (backward, setup_context)
    torch.library.register_autograd(f"kvengine::{name}", backward, setup_context=setup_context)


def _no_grad(*tensors) -> bool:
    """True when no gradient can flow: then the differentiable ops skip their autograd kernel (a Python function
    that costs ~15-45 µs per call even under ``torch.no_grad()``, e.g. one ``fwht`` per layer and decode step)."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def register_namespace(ns: str) -> None:
    """Register every op's fake and autograd formula for another library with the same schemas — the CUDA
    emulator's ``torch.ops.kvengine_emu`` (tests/cuda_emu), so opcheck and gradients work there too."""
    for name, fn in _FAKES.items():
        torch.library.register_fake(f"{ns}::{name}")(fn)
    for name, (backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup)


MODES = ("per_channel", "per_token")
BITS = (1, 2, 4, 8)


# ---- fwht -------------------------------------------------------------------------------------------------------
def fwht(x: Tensor, scale: Optional[float] = None, perm: Optional[Tensor] = None) -> Tensor:
    """Normalized fast Walsh–Hadamard transform over the last dim: ``y = x[..., perm] @ H_n * scale``.

    ``H_n`` is the Sylvester-ordered Hadamard matrix, n a power of two in [2, 32768], default scale ``1/sqrt(n)``
    (then ``fwht(fwht(x)) == x``).  fp32/fp16/bf16 with fp32 arithmetic.  Differentiable.
    """
    if _no_grad(x):
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.fwht(x, scale, perm)
    return _ops.fwht(x, scale, perm)


def fwht_(x: Tensor, scale: Optional[float] = None, perm: Optional[Tensor] = None) -> Tensor:
    """In-place fwht (no allocation; not differentiable).  Returns x."""
    _ops.fwht_(x, scale, perm)
    return x


@_fake("fwht_")
def _fwht__fake(x, scale=None, perm=None):
    return None


@_fake("fwht")
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


_autograd("fwht", _fwht_backward, _fwht_setup)


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


CLIP_MAX = 20  # most range-search candidates a quantization accepts


def quantize_pack(
    x: Tensor, bits: int, group_size: int, mode: str, meta_dtype: Optional[torch.dtype] = None, clip: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group quantization + dense bit-packing.  Returns (codes uint8, scale, zero).

    Each group's range is its min/max, or with ``clip`` = n > 1 the best of n candidate ranges shrunk around the
    group's centre (each end moves in by 0.025·c·(max − min), c = 0 … n−1) by the group's squared reconstruction
    error — an MSE-optimal clipping search (``reference.quantize`` documents the exact rule)."""
    return _ops.quantize_pack(x, bits, group_size, mode, meta_dtype, clip)


def rotate_quantize_pack(
    x: Tensor,
    bits: int,
    group_size: int,
    mode: str,
    scale: Optional[float] = None,
    perm: Optional[Tensor] = None,
    meta_dtype: Optional[torch.dtype] = None,
    clip: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """fwht(x, scale, perm) fused with quantize_pack in one pass; equals the composition exactly."""
    return _ops.rotate_quantize_pack(x, bits, group_size, mode, scale, perm, meta_dtype, clip)


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


@_fake("quantize_pack")
def _quantize_pack_fake(x, bits, group_size, mode, meta_dtype=None, clip=0):
    return _quant_fake(x, bits, group_size, mode, meta_dtype)


@_fake("rotate_quantize_pack")
def _rotate_quantize_pack_fake(x, bits, group_size, mode, scale=None, perm=None, meta_dtype=None, clip=0):
    return _quant_fake(x, bits, group_size, mode, meta_dtype)


@_fake("dequantize")
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
    k_mode: str = "per_channel",
    indices: Optional[Tensor] = None,
    qk_int8: bool = False,
) -> Tensor:
    """Exact softmax attention of q [B, Hq, Tq, D] over a quantized KV cache, in one fused pass over the packed data.

    Per sequence b (``lens[b] = (n_sink, n_quant, n_res)``) the keys/values are, in time order: ``n_sink`` full-
    precision sinks (``k_fp/v_fp[b, :, :n_sink]``), ``n_quant`` packed tokens (keys per-channel in groups of
    ``k_group`` tokens — or with ``k_mode="per_token"`` per token in groups of ``k_group`` channels, scale/zero
    ``[B, Hkv, capacity, D/k_group]`` —, values per-token in groups of ``v_group`` channels), and ``n_res``
    full-precision recent tokens
    (``k_fp/v_fp[b, :, n_sink:n_sink+n_res]``).  The Tq queries are the newest Tq tokens (causal among themselves).
    With ``rotate_k`` the cache holds fwht(k[..., k_perm]) and q is rotated the same way; with ``rotate_v`` the
    values are rotated and the output is rotated back.  See ``QuantizedKVCache`` for the usual way to build these.
    ``indices`` [B, Hkv, n] (int32/int64, Tq = 1; retrieval, e.g. from ``hamming_topk``): query head hq attends only
    the logical positions ``indices[b, hq // g]`` (entries < 0 or ≥ N skipped, duplicates count twice; a row with
    none gives 0), dequantized on the fly — sparse attention over the packed cache.
    ``qk_int8`` (CPU; per-channel keys of ≤ 4 bits, no ``indices``): the packed keys' scores come from integer dot
    products (VNNI) of the codes with the query rounded to int8 per key group, ``max|q'|/127 · Σ q8·code + q·zero``
    with ``q' = q·softmax_scale·k_scale`` (``reference.int8_qk_scores``); sinks, recent tokens and every other case
    stay exact, and CUDA ignores the flag.  The extra error is a small fraction of the keys' quantization error.
    """
    return _ops.quant_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k,
                                       bits_v, k_group, v_group, softmax_scale, rotate_k, rotate_v, k_perm, v_perm,
                                       k_mode, indices, qk_int8)


@_fake("quant_decode_attention")
def _quant_decode_attention_fake(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_fp, v_fp, lens, bits_k,
                                 bits_v, k_group, v_group, softmax_scale=None, rotate_k=False, rotate_v=False,
                                 k_perm=None, v_perm=None, k_mode="per_channel", indices=None, qk_int8=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---- 1-bit QK attention (BinaryAttention) ---------------------------------------------------------------------------
def sign_pack(x: Tensor, center: bool = False) -> tuple[Tensor, Tensor]:
    """Packed signs of x [..., L, D] (D a multiple of 32) → (bits int32 [..., L, D/32], scale fp32 [..., L]).

    Bit j of word w (read as uint32) is 1 iff x[..., 32w + j] < 0 (sign(0) = +1); scale = mean |x| over D.  With
    ``center`` the mean over the token axis (dim −2) is subtracted first (per channel).
    """
    return _ops.sign_pack(x, center)


def binary_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, rel_bias: Optional[Tensor] = None,
                     causal: bool = False, center_k: bool = True, softmax_scale: Optional[float] = None) -> Tensor:
    """1-bit QK attention (BinaryAttention), one fused flash-style kernel: scores from popcounts of packed signs,

    ``score[i, j] = softmax_scale · α_i · β_j · (D − 2·popcount(sign(q_i) ^ sign(k_j))) + bias[.., i, j]
    + rel_bias[h, R − 1 + i + Lk − Lq − j]``, α = mean|q_i|, β = mean|k_j| (keys centered over tokens first when
    ``center_k``), causal: j ≤ i + Lk − Lq; out = softmax(score) · v in fp32, in v's dtype.  q [B, Hq, Lq, D],
    k/v [B, Hkv, Lk, D], D a multiple of 32, Hq a multiple of Hkv.  bias: [Hq, Lq, Lk] or [B, Hq, Lq, Lk] (B, Hq may
    be 1); rel_bias: [Hq, 2R − 1], R ≥ max(Lq, Lk).  Differentiable (straight-through sign, reference-speed backward).
    """
    if _no_grad(q, k, v, bias, rel_bias):
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.binary_attention(q, k, v, bias, rel_bias, causal, center_k, softmax_scale)
    return _ops.binary_attention(q, k, v, bias, rel_bias, causal, center_k, softmax_scale)


def binary_attention_packed(q: Tensor, k_bits: Tensor, k_scale: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                            rel_bias: Optional[Tensor] = None, causal: bool = False,
                            softmax_scale: Optional[float] = None) -> Tensor:
    """binary_attention over a cache of 1-bit keys (k_bits, k_scale from ``sign_pack``), e.g. decode (Lq small)."""
    if _no_grad(q, k_scale, v, bias, rel_bias):
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.binary_attention_packed(q, k_bits, k_scale, v, bias, rel_bias, causal, softmax_scale)
    return _ops.binary_attention_packed(q, k_bits, k_scale, v, bias, rel_bias, causal, softmax_scale)


@_fake("sign_pack")
def _sign_pack_fake(x, center=False):
    *lead, L, D = x.shape
    return x.new_empty((*lead, L, D // 32), dtype=torch.int32), x.new_empty((*lead, L), dtype=torch.float32)


@_fake("binary_attention")
def _binary_attention_fake(q, k, v, bias=None, rel_bias=None, causal=False, center_k=True, softmax_scale=None):
    B, Hq, Lq, D = q.shape
    return v.new_empty((B, Hq, Lq, D))


@_fake("binary_attention_packed")
def _binary_attention_packed_fake(q, k_bits, k_scale, v, bias=None, rel_bias=None, causal=False, softmax_scale=None):
    B, Hq, Lq, D = q.shape
    return v.new_empty((B, Hq, Lq, D))


def _binary_setup(ctx, inputs, output):
    ctx.is_tensor = [isinstance(a, Tensor) for a in inputs]
    ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor)]
    ctx.save_for_backward(*(a for a in inputs if isinstance(a, Tensor)))


def _binary_backward_with(fn, ctx, grad):
    # straight-through estimator: recompute the reference (sign_ste) and differentiate it
    from . import reference as _ref

    saved = iter(ctx.saved_tensors)
    args = [next(saved) if t else a for a, t in zip(ctx.others, ctx.is_tensor)]
    need = [isinstance(a, Tensor) and a.is_floating_point() and ctx.needs_input_grad[i] for i, a in enumerate(args)]
    with torch.enable_grad():
        leaves = [a.detach().requires_grad_(True) if n else a for a, n in zip(args, need)]
        out = getattr(_ref, fn)(*leaves)
        wrt = [a for a, n in zip(leaves, need) if n]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True)) if wrt else iter(())
    return tuple(next(grads) if n else None for n in need)


def _binary_attention_backward(ctx, grad):
    return _binary_backward_with("binary_attention", ctx, grad)


def _binary_attention_packed_backward(ctx, grad):
    return _binary_backward_with("binary_attention_packed", ctx, grad)


_autograd("binary_attention", _binary_attention_backward, _binary_setup)
_autograd("binary_attention_packed", _binary_attention_packed_backward, _binary_setup)


# ---- hash-based top-k KV retrieval (Spotlight Attention) ---------------------------------------------------------------
HASH_NBITS = (32, 64, 128, 256)


def hash_encode(x: Tensor, w1: Tensor, b1: Optional[Tensor] = None, w2: Optional[Tensor] = None,
                b2: Optional[Tensor] = None, nbits: Optional[int] = None) -> Tensor:
    """Packed sign codes of a hash projection: int32 [..., nbits/32] (uint32 words; bit j of word w is 1 iff
    ``f[32w + j] > 0``).

    ``u = x @ w1 (+ b1)``; ``f = u`` (``w2`` None: random-hyperplane LSH when w1 is Gaussian) or
    ``f = u + silu(u) @ w2 (+ b2)`` (Spotlight's per-head MLP: 2 layers, SiLU, residual; zero w2 gives back the
    linear hash).  Weights are shared (w1 [D, nbits], b1/b2 [nbits], w2 [nbits, nbits], x [..., D]) or per head
    (w1 [H, D, nbits], b1/b2 [H, nbits], w2 [H, nbits, nbits], x [..., H, T, D]).  fp32 math; nbits ∈ {32, 64, 128,
    256} (= w1.shape[-1]; ``nbits`` is only checked).
    """
    return _ops.hash_encode(x, w1, b1, w2, b2, nbits)


@_fake("hash_encode")
def _hash_encode_fake(x, w1, b1=None, w2=None, b2=None, nbits=None):
    return x.new_empty((*x.shape[:-1], w1.shape[-1] // 32), dtype=torch.int32)


def hamming_topk(q_codes: Tensor, k_codes: Tensor, k: int, seq_lens: Optional[Tensor] = None,
                 keep: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
    """Top-k keys by Hamming similarity summed over each GQA group: (indices, scores), int32 [B, Hkv, k].

    ``score(p) = Σ_{query heads i of group h} (nbits − popcount(q_codes[b, i] ^ k_codes[b, h, p]))``.
    q_codes [B, Hq, W] or [B, Hq, 1, W]; k_codes [B, Hkv, N, W]; seq_lens [B] (default N).  ``keep=(sinks, recent)``:
    the first ``sinks`` and last ``recent`` positions are always selected and count toward k (sinks + recent ≤ k).
    Exact selection with deterministic ties (equal scores: lower position first); indices ascending; where a
    sequence holds fewer than k tokens the remaining slots are -1 (scores -1).  k must be ≤ N.
    """
    return _ops.hamming_topk(q_codes, k_codes, k, seq_lens, None if keep is None else list(keep))


@_fake("hamming_topk")
def _hamming_topk_fake(q_codes, k_codes, k, seq_lens=None, keep=None):
    B, Hkv = k_codes.shape[0], k_codes.shape[1]
    return (k_codes.new_empty((B, Hkv, k), dtype=torch.int32), k_codes.new_empty((B, Hkv, k), dtype=torch.int32))


def sparse_decode_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, seq_lens: Optional[Tensor] = None,
                            softmax_scale: Optional[float] = None) -> Tensor:
    """Exact softmax attention of q [B, Hq, 1, D] over the gathered tokens ``indices[b, hq // g]`` of k/v
    [B, Hkv, N, D] only (fused gather + softmax + P·V, fp32 math, q's dtype).  indices [B, Hkv, n] int32/int64;
    entries < 0 or ≥ seq_lens[b] are skipped (the -1 padding of hamming_topk); a row with no valid index gives 0."""
    return _ops.sparse_decode_attention(q, k, v, indices, seq_lens, softmax_scale)


@_fake("sparse_decode_attention")
def _sparse_decode_attention_fake(q, k, v, indices, seq_lens=None, softmax_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
