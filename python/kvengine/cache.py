"""QuantizedKVCache — one layer's KV cache stored in 2/4 bits (KIVI layout, optional RotateKV rotation, sinks),
attended directly in packed form by ``quant_decode_attention``.

Storage (per sequence b and KV head h, all tensors preallocated with capacity that grows in chunks):
  * full-precision segment ``k_fp/v_fp [B, H, f_cap, D]``: slots [0, n_sink) are attention sinks (the first
    ``sinks`` tokens and any extra sink positions), slots [n_sink, n_sink + n_res) the most recent tokens;
  * quantized segment: keys ``k_codes [B, H, q_cap, D·bits_k/8]`` with per-channel scale/zero per group of
    ``group_size`` tokens (KIVI; or with ``k_mode="per_token"`` per-token scale/zero per group of ``k_group``
    channels), values ``v_codes [B, H, q_cap, D·bits_v/8]`` with per-token scale/zero per group of ``v_group``
    channels.
New tokens enter the recent window; once it holds ``residual + group_size`` tokens its oldest ``group_size`` tokens
are quantized (KIVI flush).  With rotation, everything stored (all segments) lives in the rotated space
fwht(x[..., perm]); the attention op rotates the query and rotates the output back, so callers never see it.
Logical (time) order seen by attention and by ``dequantize()``: sinks, quantized tokens, recent tokens.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import ops
from . import reference as ref

RotateSpec = Union[bool, str]

# rotate="auto" without a calibrated plan: rotate only the values.  Measured on SmolLM2-135M (2-bit, G=32, R=128,
# 4 sinks; PPL ratio to fp32): none 1.029, values 1.027, keys 1.013, both 1.014; on a model whose keys are normalized
# per head (head_dim 256) rotating the keys raised the ratio far more than it ever helped and rotating only the values
# was best.  Value rotation is never much worse than the best choice on either; key rotation can be much worse.
# ``kvengine.calibrate`` measures the choice per layer instead (docs/design.md, "Automatic configuration").
DEFAULT_ROTATE = "v"

# clip="auto": MSE range search (``CLIP_STEPS`` candidate ranges per group, ops.quantize_pack(clip=…)) for the keys,
# min/max for the values.  Measured on SmolLM2-135M (INT2 G64 R128 S4, keys+values rotated; PPL ratio to fp32 on
# 4 × 1024 tokens): min/max 1.0301, keys searched 1.0104, values searched 1.0257, both 1.0167 — the search minimizes
# each value group's own error, which is not what attention needs from values; for keys it wins clearly.
DEFAULT_CLIP = "k"
CLIP_STEPS = 11  # candidate ranges: both ends moved in by 0, 2.5 %, …, 25 % of the group's range


def _parse_rotate(rotate: RotateSpec) -> tuple[bool, bool]:
    if rotate == "auto":
        rotate = DEFAULT_ROTATE
    if rotate is True or rotate == "kv":
        return True, True
    if rotate is False or rotate == "none":
        return False, False
    if rotate == "k":
        return True, False
    if rotate == "v":
        return False, True
    raise ValueError(f"QuantizedKVCache: rotate must be 'auto', True, False, 'k', 'v', 'kv' or 'none', got {rotate!r}")


def _parse_clip(clip: RotateSpec) -> tuple[bool, bool]:
    if clip == "auto":
        clip = DEFAULT_CLIP
    if clip is True or clip == "kv":
        return True, True
    if clip is False or clip == "none":
        return False, False
    if clip == "k":
        return True, False
    if clip == "v":
        return False, True
    raise ValueError(f"QuantizedKVCache: clip must be 'auto', True, False, 'k', 'v', 'kv' or 'none', got {clip!r}")


def detect_sinks(x: Tensor, top: int = 4, min_ratio: float = 4.0, exclude_last: int = 0) -> Tensor:
    """Token positions with massive activations (KVSink / RotateKV): x is [..., T, C] (hidden states or keys);
    a token's score is its max |x| over channels (max over leading dims); returns a bool mask [T] of at most ``top``
    tokens whose score is >= ``min_ratio`` × the median token score.  The last ``exclude_last`` tokens are never
    chosen (they stay in the full-precision recent window anyway)."""
    if x.dim() < 2:
        raise ValueError(f"detect_sinks: x must be [..., T, C], got shape {tuple(x.shape)}")
    score = x.detach().abs().amax(-1)
    score = score.reshape(-1, score.shape[-1]).amax(0).float()
    T = score.shape[0]
    mask = torch.zeros(T, dtype=torch.bool, device=x.device)
    limit = T - exclude_last
    if limit <= 0 or top <= 0:
        return mask
    s = score[:limit]
    med = score.median()
    k = min(top, limit)
    vals, idx = s.topk(k)
    mask[idx[vals >= min_ratio * med]] = True
    return mask


def row_index(index, B: int, device, who: str = "select_rows") -> Tensor:
    """A batch-row index (ints in [0, B), or a bool mask over B rows) as a 1-D int64 tensor on ``device``."""
    idx = torch.as_tensor(index, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (B,):
            raise ValueError(f"{who}: a bool mask must have shape [{B}], got {tuple(idx.shape)}")
        idx = idx.nonzero().flatten()
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dim() > 1:
        raise ValueError(f"{who}: index must be a 1-D integer tensor (or a bool mask)")
    idx = idx.flatten().long()
    if idx.numel() < 1:
        raise ValueError(f"{who}: no rows selected")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= B:
        raise ValueError(f"{who}: row indices must be in [0, {B}), got {lo}..{hi}")
    return idx


def left_padding(valid: Tensor, B: int, T: int, device, who: str) -> Optional[Tensor]:
    """Check a left-padding mask (bool [B, T], True = real token; each row False... then True..., at least one
    real token) and return it on ``device``, or None when every token is real."""
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != (B, T):
        raise ValueError(f"{who}: valid must be a bool tensor of shape [B={B}, T={T}]")
    valid = valid.to(device)
    if bool(valid.all()):
        return None
    v = valid.to(torch.int8)
    if bool((v[:, 1:] < v[:, :-1]).any()):
        raise ValueError(f"{who}: valid must be left padding (each row: False... then True...); right padding or "
                         "holes are not supported")
    if not bool(valid[:, -1].all()):
        raise ValueError(f"{who}: every row of a padded prompt needs at least one real token")
    return valid


class QuantizedKVCache:
    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        *,
        bits_k: int = 2,
        bits_v: int = 2,
        group_size: int = 32,
        residual: int = 128,
        sinks: int = 4,
        rotate: RotateSpec = "auto",
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        k_perm: Optional[Tensor] = None,
        v_perm: Optional[Tensor] = None,
        v_group: Optional[int] = None,
        meta_dtype: Optional[torch.dtype] = None,
        chunk: int = 1024,
        clip: RotateSpec = "auto",
        k_mode: str = "per_channel",
        k_group: Optional[int] = None,
        qk_int8: bool = False,
    ):
        if bits_k not in ops.BITS or bits_v not in ops.BITS:
            raise ValueError(f"QuantizedKVCache: bits_k/bits_v must be in {ops.BITS}, got {bits_k}/{bits_v}")
        if num_kv_heads < 1 or batch_size < 1:
            raise ValueError("QuantizedKVCache: num_kv_heads and batch_size must be >= 1")
        if head_dim % 16 or head_dim > 256:
            raise ValueError(f"QuantizedKVCache: head_dim must be a multiple of 16 up to 256, got {head_dim}")
        if group_size < 1 or residual < 0 or sinks < 0:
            raise ValueError("QuantizedKVCache: group_size >= 1, residual >= 0, sinks >= 0 required")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"QuantizedKVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.rotate_k, self.rotate_v = _parse_rotate(rotate)
        ck, cv = _parse_clip(clip)
        self.clip_k, self.clip_v = (CLIP_STEPS if ck else 0), (CLIP_STEPS if cv else 0)
        if (self.rotate_k or self.rotate_v) and head_dim & (head_dim - 1):
            raise ValueError(f"QuantizedKVCache: rotation needs a power-of-two head_dim, got {head_dim}")
        self.H, self.D, self.B = num_kv_heads, head_dim, batch_size
        self.bits_k, self.bits_v, self.G, self.R, self.S = bits_k, bits_v, group_size, residual, sinks
        self.v_group = v_group or min(group_size, head_dim)
        if self.v_group % 16 or head_dim % self.v_group:
            raise ValueError(f"QuantizedKVCache: v_group ({self.v_group}) must be a multiple of 16 dividing "
                             f"head_dim ({head_dim})")
        if k_mode not in ("per_channel", "per_token"):
            raise ValueError(f"QuantizedKVCache: k_mode must be 'per_channel' or 'per_token', got {k_mode!r}")
        self.k_mode = k_mode
        if not isinstance(qk_int8, bool):
            raise ValueError(f"QuantizedKVCache: qk_int8 must be a bool, got {qk_int8!r}")
        # int8 QK in attend(): the CPU kernel's integer scores over the packed keys (ops.quant_decode_attention)
        self.qk_int8 = qk_int8
        # per-token keys: channels per key group (default like the values); per-channel keys: the token group G
        self.k_group = (k_group or min(group_size, head_dim)) if k_mode == "per_token" else group_size
        if k_mode == "per_token" and (self.k_group % 16 or head_dim % self.k_group):
            raise ValueError(f"QuantizedKVCache: k_group ({self.k_group}) must be a multiple of 16 dividing "
                             f"head_dim ({head_dim})")
        if k_mode == "per_channel" and k_group is not None:
            raise ValueError("QuantizedKVCache: k_group is only for k_mode='per_token' (per-channel keys are grouped "
                             "by group_size tokens)")
        self.dtype, self.device = dtype, torch.device(device)
        # fp16 scale/zero (32/G bits per element) unless the data is bf16
        self.meta_dtype = meta_dtype or (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
        self.k_perm = None if k_perm is None else k_perm.to(self.device, torch.long)
        self.v_perm = None if v_perm is None else v_perm.to(self.device, torch.long)
        if self.k_perm is not None and not self.rotate_k:
            raise ValueError("QuantizedKVCache: k_perm needs key rotation")
        if self.v_perm is not None and not self.rotate_v:
            raise ValueError("QuantizedKVCache: v_perm needs value rotation")
        self.chunk = max(group_size, (chunk // group_size) * group_size)
        self.n_sink = self.n_quant = self.n_res = 0
        self.n_seen = 0  # tokens appended so far
        self._sink_end = 0  # 1 + the time position of the newest sink (tokens after it are all stream tokens)
        # rows of unequal length (a left-padded prompt): row b holds n_res - _short[b] recent tokens (None: all equal;
        # the counters n_seen / n_res describe the longest row)
        self._short: Optional[list] = None
        self.q = self._new_q(0)
        self._alloc_fp(self.S + self.R + self.G + 8)
        self._lens = torch.zeros(self.B, 3, dtype=torch.int32, device=self.device)

    @classmethod
    def from_plan(cls, plan, layer: int, num_kv_heads: int, **kwargs) -> "QuantizedKVCache":
        """The cache of layer ``layer`` of a calibrated per-layer plan (``kvengine.calibrate``: an ``AutoPlan``, its
        dict or the path of its JSON): bits, group size, rotation, key channel order, residual and sinks come from
        the plan; ``kwargs`` give the rest (batch_size, dtype, device, ...) and may not override the plan."""
        from .autoconfig import as_auto_plan

        p = as_auto_plan(plan)
        if not 0 <= layer < len(p.layers):
            raise ValueError(f"QuantizedKVCache.from_plan: layer {layer} is not in the plan ({len(p.layers)} layers)")
        kw = p.cache_kwargs(layer)
        clash = sorted(set(kw) & set(kwargs))
        if clash:
            raise ValueError(f"QuantizedKVCache.from_plan: {clash} come from the plan; do not pass them")
        return cls(num_kv_heads, p.head_dim, **kw, **kwargs)

    # ---- storage -----------------------------------------------------------------------------------------------------
    def _alloc_fp(self, cap: int):
        self.k_fp = torch.zeros(self.B, self.H, cap, self.D, dtype=self.dtype, device=self.device)
        self.v_fp = torch.zeros_like(self.k_fp)

    @property
    def q_cap(self) -> int:
        return self.q["k_codes"].shape[2]

    # ---- public API --------------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Tokens cached (of the longest row, when the rows of a left-padded prompt differ)."""
        return self.n_sink + self.n_quant + self.n_res

    @property
    def row_lens(self) -> list:
        """Tokens cached per row."""
        n = self.seq_len
        return [n] * self.B if self._short is None else [n - d for d in self._short]

    def _row_res(self) -> list:
        return [self.n_res] * self.B if self._short is None else [self.n_res - d for d in self._short]

    def _set_lens(self) -> None:
        rows = [[self.n_sink, self.n_quant, r] for r in self._row_res()]
        self._lens.copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)

    def _rot(self, x: Tensor, rotate: bool, perm: Optional[Tensor]) -> Tensor:
        return ops.fwht(x, None, perm) if rotate else x

    def _check(self, name: str, x: Tensor, T: Optional[int] = None):
        if not isinstance(x, Tensor):
            raise TypeError(f"QuantizedKVCache: {name} must be a tensor")
        if x.dim() != 4 or x.shape[0] != self.B or x.shape[1] != self.H or x.shape[3] != self.D:
            raise ValueError(f"QuantizedKVCache: {name} must be [B={self.B}, H_kv={self.H}, T, D={self.D}], "
                             f"got {tuple(x.shape)}")
        if T is not None and x.shape[2] != T:
            raise ValueError(f"QuantizedKVCache: {name} has {x.shape[2]} tokens but k has {T}")
        if x.shape[2] < 1:
            raise ValueError(f"QuantizedKVCache: {name} has no tokens")
        if x.dtype != self.dtype:
            raise ValueError(f"QuantizedKVCache: {name} must be {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"QuantizedKVCache: {name} is on {x.device}, the cache is on {self.device}")

    def append(self, k: Tensor, v: Tensor, sink_mask: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> None:
        """Append T new tokens: k, v [B, H_kv, T, D].  ``sink_mask`` ([T] bool, shared by the batch) marks extra
        attention-sink tokens among them (kept in full precision; see ``detect_sinks``).  ``valid`` ([B, T] bool, first
        append only): a left-padded prompt — row b's real tokens are its last ``valid[b].sum()``, the padding is
        dropped, and the rows then hold different lengths (each row keeps min(sinks, shortest prompt) sinks; the
        recent windows flush together when the shortest one is full, so longer rows hold a few more tokens in full
        precision).  On any error the cache is left exactly as it was."""
        self._check("k", k)
        T = k.shape[2]
        self._check("v", v, T)
        if valid is not None:
            valid = self._check_valid(valid, T, sink_mask)
            if valid is not None:
                self._append_padded(k, v, valid)
                return
        if self._short is not None:
            if sink_mask is not None:
                raise ValueError("QuantizedKVCache: sink_mask is not supported once rows differ in length")
            self._append_ragged(k, v, T)
            return
        if sink_mask is not None:
            if sink_mask.shape != (T,) or sink_mask.dtype != torch.bool:
                raise ValueError(f"QuantizedKVCache: sink_mask must be a bool tensor of shape [{T}]")
            sink_mask = sink_mask.to(self.device)
        elif (self._fast_append and self.n_seen >= self.S and self.n_res + T - self.R < self.G
              and self.n_sink + self.n_res + T <= self.k_fp.shape[2]):
            # decode: no sink among the new tokens, nothing flushed, room left — they only extend the recent window
            # (what the general path below computes, without its ~25 small tensor ops per call)
            kr = self._rot(k, self.rotate_k, self.k_perm)
            vr = self._rot(v, self.rotate_v, self.v_perm)
            a = self.n_sink + self.n_res
            self.k_fp[:, :, a : a + T] = kr
            self.v_fp[:, :, a : a + T] = vr
            self.n_res += T
            self.n_seen += T
            self._lens[:, 2].fill_(self.n_res)
            return
        self._append_general(k, v, sink_mask, T)

    _fast_append = True  # the decode shortcut of append (tests compare it with the general path)

    def _append_general(self, k: Tensor, v: Tensor, sink_mask: Optional[Tensor], T: int) -> None:
        # ---- compute everything into temporaries (nothing visible changes until the commit below) -------------
        is_sink = torch.zeros(T, dtype=torch.bool, device=self.device)
        n_first = min(T, max(0, self.S - self.n_seen))  # the first `sinks` tokens of the sequence
        is_sink[:n_first] = True
        if sink_mask is not None:
            is_sink |= sink_mask
        new_sink_idx = is_sink.nonzero().flatten()
        stream_idx = (~is_sink).nonzero().flatten()
        ns_new, nt_stream = int(new_sink_idx.numel()), int(stream_idx.numel())
        kr = self._rot(k, self.rotate_k, self.k_perm)
        vr = self._rot(v, self.rotate_v, self.v_perm)
        n_res_all = self.n_res + nt_stream
        F = max(0, (n_res_all - self.R) // self.G * self.G)  # tokens flushed to the quantized segment
        q_parts = None
        if F > 0:
            k_old, v_old = self.k_fp[:, :, self.n_sink : self.n_sink + self.n_res], self.v_fp[:, :, self.n_sink : self.n_sink + self.n_res]
            take_old = min(F, self.n_res)
            take_new = F - take_old
            if take_old == 0:
                # bulk path (prefill): the flushed tokens come straight from the input — fused rotate + quantize
                idx = stream_idx[:take_new]
                kq = self._quant_k(k.index_select(2, idx), fused=self.rotate_k)
                vq = self._quant_v(v.index_select(2, idx), fused=self.rotate_v)
            else:
                kf = torch.cat([k_old[:, :, :take_old], kr.index_select(2, stream_idx[:take_new])], 2)
                vf = torch.cat([v_old[:, :, :take_old], vr.index_select(2, stream_idx[:take_new])], 2)
                kq, vq = self._quant_k(kf, fused=False), self._quant_v(vf, fused=False)
            q_parts = (kq, vq)
        # new full-precision contents: sinks then the remaining recent tokens
        res_all_k = torch.cat([self.k_fp[:, :, self.n_sink : self.n_sink + self.n_res], kr.index_select(2, stream_idx)], 2)
        res_all_v = torch.cat([self.v_fp[:, :, self.n_sink : self.n_sink + self.n_res], vr.index_select(2, stream_idx)], 2)
        res_k, res_v = res_all_k[:, :, F:], res_all_v[:, :, F:]
        n_sink2, n_res2, n_quant2 = self.n_sink + ns_new, n_res_all - F, self.n_quant + F
        # capacity (new buffers are made before anything is overwritten)
        q_new = self._grown_q(n_quant2)
        f_need = n_sink2 + n_res2
        fp_new = None
        if f_need > self.k_fp.shape[2]:
            cap = f_need + self.R + self.G + 8
            kf_new = torch.zeros(self.B, self.H, cap, self.D, dtype=self.dtype, device=self.device)
            fp_new = (kf_new, torch.zeros_like(kf_new))
        # ---- commit --------------------------------------------------------------------------------------------
        sinks_k = torch.cat([self.k_fp[:, :, : self.n_sink], kr.index_select(2, new_sink_idx)], 2)
        sinks_v = torch.cat([self.v_fp[:, :, : self.n_sink], vr.index_select(2, new_sink_idx)], 2)
        if q_new is not None:
            self.q = q_new
        if q_parts is not None:
            self._write_q(q_parts, self.n_quant, n_quant2)
        if fp_new is not None:
            self.k_fp, self.v_fp = fp_new
        self.k_fp[:, :, :n_sink2] = sinks_k
        self.v_fp[:, :, :n_sink2] = sinks_v
        self.k_fp[:, :, n_sink2 : n_sink2 + n_res2] = res_k
        self.v_fp[:, :, n_sink2 : n_sink2 + n_res2] = res_v
        self.n_sink, self.n_quant, self.n_res = n_sink2, n_quant2, n_res2
        if ns_new:
            self._sink_end = self.n_seen + int(new_sink_idx[-1]) + 1
        self.n_seen += T
        self._lens.copy_(torch.tensor([[n_sink2, n_quant2, n_res2]] * self.B, dtype=torch.int32), non_blocking=True)

    # ---- rows of unequal length (left-padded prompts) ------------------------------------------------------------
    def _check_valid(self, valid: Tensor, T: int, sink_mask: Optional[Tensor]) -> Optional[Tensor]:
        """A left-padding mask [B, T] -> the mask on the device, or None when every token is real."""
        valid = left_padding(valid, self.B, T, self.device, "QuantizedKVCache")
        if valid is None:
            return None
        if self.n_seen:
            raise ValueError("QuantizedKVCache: padding (valid) is only accepted in the first append (a left-padded "
                             "prompt); later tokens must all be real")
        if sink_mask is not None:
            raise ValueError("QuantizedKVCache: sink_mask and padding (valid) together are not supported")
        return valid

    def _append_padded(self, k: Tensor, v: Tensor, valid: Tensor) -> None:
        """First append of a left-padded prompt: per row the real tokens only."""
        T = k.shape[2]
        L = [int(x) for x in valid.sum(1).tolist()]
        S = min(self.S, min(L))
        start = [T - n for n in L]
        F = max(0, (min(L) - S - self.R) // self.G * self.G)  # flushed in every row (the shortest row decides)
        res = [n - S - F for n in L]
        n_res = max(res)

        def rows(x, a, b):  # [B, H, b - a, D]: tokens a..b-1 of each row's real tokens
            return torch.stack([x[i, :, s + a : s + b] for i, s in enumerate(start)])

        kr = self._rot(k, self.rotate_k, self.k_perm)
        vr = self._rot(v, self.rotate_v, self.v_perm)
        q_parts = None
        if F:
            q_parts = (self._quant_k(rows(k, S, S + F), fused=self.rotate_k),
                       self._quant_v(rows(v, S, S + F), fused=self.rotate_v))
        q_new = self._grown_q(F)
        cap = max(self.k_fp.shape[2], S + n_res + self.R + self.G + 8)
        k_fp = torch.zeros(self.B, self.H, cap, self.D, dtype=self.dtype, device=self.device)
        v_fp = torch.zeros_like(k_fp)
        k_fp[:, :, :S], v_fp[:, :, :S] = rows(kr, 0, S), rows(vr, 0, S)
        for i, s in enumerate(start):
            k_fp[i, :, S : S + res[i]] = kr[i, :, s + S + F :]
            v_fp[i, :, S : S + res[i]] = vr[i, :, s + S + F :]
        # ---- commit
        if q_new is not None:
            self.q = q_new
        if q_parts is not None:
            self._write_q(q_parts, 0, F)
        self.k_fp, self.v_fp = k_fp, v_fp
        self.S = S
        self.n_sink, self.n_quant, self.n_res = S, F, n_res
        self.n_seen = max(L)
        self._sink_end = S
        self._short = [n_res - r for r in res]
        self._set_lens()

    def _append_ragged(self, k: Tensor, v: Tensor, T: int) -> None:
        """T new (real) tokens for each row when the rows differ in length: row b's go after its own recent window;
        the windows flush together once the shortest one holds residual + group_size tokens."""
        ns, res = self.n_sink, self._row_res()
        kr = self._rot(k, self.rotate_k, self.k_perm)
        vr = self._rot(v, self.rotate_v, self.v_perm)
        F = max(0, (min(res) + T - self.R) // self.G * self.G)
        n_res2 = self.n_res + T - F
        if F == 0 and ns + n_res2 <= self.k_fp.shape[2]:
            # decode: each row's tokens straight after its own recent tokens
            pos = torch.tensor([[ns + r + t for t in range(T)] for r in res], device=self.device)
            bi = torch.arange(self.B, device=self.device)[:, None]
            self.k_fp[bi, :, pos] = kr.transpose(1, 2)
            self.v_fp[bi, :, pos] = vr.transpose(1, 2)
        else:
            kall = [torch.cat([self.k_fp[i, :, ns : ns + r], kr[i]], 1) for i, r in enumerate(res)]
            vall = [torch.cat([self.v_fp[i, :, ns : ns + r], vr[i]], 1) for i, r in enumerate(res)]
            q_parts = None
            if F:
                q_parts = (self._quant_k(torch.stack([x[:, :F] for x in kall]), fused=False),
                           self._quant_v(torch.stack([x[:, :F] for x in vall]), fused=False))
            n_quant2 = self.n_quant + F
            q_new = self._grown_q(n_quant2)
            k_fp, v_fp = self.k_fp, self.v_fp
            if ns + n_res2 > k_fp.shape[2]:
                k_fp = torch.zeros(self.B, self.H, ns + n_res2 + self.R + self.G + 8, self.D, dtype=self.dtype,
                                   device=self.device)
                v_fp = torch.zeros_like(k_fp)
                k_fp[:, :, :ns], v_fp[:, :, :ns] = self.k_fp[:, :, :ns], self.v_fp[:, :, :ns]
            # ---- commit
            if q_new is not None:
                self.q = q_new
            if q_parts is not None:
                self._write_q(q_parts, self.n_quant, n_quant2)
            for i, r in enumerate(res):
                k_fp[i, :, ns : ns + r + T - F] = kall[i][:, F:]
                v_fp[i, :, ns : ns + r + T - F] = vall[i][:, F:]
            self.k_fp, self.v_fp = k_fp, v_fp
            self.n_quant = n_quant2
        self.n_res = n_res2
        self.n_seen += T
        self._set_lens()

    def _grown_q(self, n_quant: int) -> Optional[dict]:
        """New quantized buffers (the used part copied) if ``n_quant`` tokens do not fit, else None."""
        if n_quant <= self.q_cap:
            return None
        cap = max(n_quant, self.q_cap + max(self.chunk, self.q_cap // 4))
        return self._new_q(-(-cap // self.G) * self.G, self._q_used())

    def _write_q(self, q_parts, a: int, b: int) -> None:
        """Store quantized tokens a..b-1 (the outputs of _quant_k / _quant_v)."""
        (kc, ks, kz), (vc, vs, vz) = q_parts
        self.q["k_codes"][:, :, a:b] = kc
        ka, kb = (a, b) if self.k_mode == "per_token" else (a // self.G, b // self.G)
        self.q["k_scale"][:, :, ka:kb] = ks
        self.q["k_zero"][:, :, ka:kb] = kz
        self.q["v_codes"][:, :, a:b] = vc
        self.q["v_scale"][:, :, a:b] = vs
        self.q["v_zero"][:, :, a:b] = vz

    # ---- editing (beam search, batch selection, speculative decoding) -------------------------------------------
    def select_rows(self, index) -> None:
        """Keep, reorder or repeat sequences: row i of the cache becomes row ``index[i]`` of the old one (an int index
        of any length ≥ 1, or a bool mask over the B rows).  Beam search reorders with it, batch selection and
        repeat-interleave are special cases.  Every row holds the same number of tokens, so this is one
        ``index_select`` of each buffer; the kept rows' contents are unchanged bit for bit."""
        idx = row_index(index, self.B, self.device, "QuantizedKVCache.select_rows")
        self.q = {name: t.index_select(0, idx) for name, t in self.q.items()}
        self.k_fp, self.v_fp = self.k_fp.index_select(0, idx), self.v_fp.index_select(0, idx)
        self._lens = self._lens.index_select(0, idx)
        self.B = int(idx.numel())
        if self._short is not None:
            short = [self._short[i] for i in idx.tolist()]
            m = min(short)  # the counters follow the longest remaining row
            self.n_res -= m
            self.n_seen -= m
            self._short = [d - m for d in short] if max(short) > m else None

    @property
    def n_truncatable(self) -> int:
        """How many of the newest tokens ``truncate`` can drop: those still in the full-precision recent window and
        newer than every sink."""
        return max(0, min(min(self._row_res()), self.n_seen - self._sink_end))

    def truncate(self, n: int) -> None:
        """Drop the ``n`` newest tokens (speculative / assisted decoding rejects draft tokens).  Exact for tokens still
        in the full-precision recent window (``n_truncatable``, at least ``residual`` tokens once the window has
        filled); older tokens are already quantized and cannot be taken back, which raises.  The kept tokens stay
        exactly as they were; if the dropped tokens had triggered a flush, some kept tokens are already quantized
        that a decode which never saw the dropped ones would still hold in full precision (the recent window is then
        shorter than ``residual`` until new tokens refill it)."""
        n = int(n)
        if n < 0:
            raise ValueError(f"QuantizedKVCache.truncate: n must be >= 0, got {n}")
        if n == 0:
            return
        if n > self.n_truncatable:
            raise ValueError(
                f"QuantizedKVCache.truncate: cannot drop the newest {n} tokens — only {self.n_truncatable} of the "
                f"{min(self.row_lens)} are still in the full-precision recent window (older ones are quantized or "
                f"sinks); use a residual window of at least the number of draft tokens (residual={self.R})")
        self.n_res -= n
        self.n_seen -= n
        self._set_lens()

    def _new_q(self, cap: int, old: Optional[dict] = None) -> dict:
        B, H, D, G = self.B, self.H, self.D, self.G
        dev, md = self.device, self.meta_dtype
        kmeta = (cap, D // self.k_group) if self.k_mode == "per_token" else (cap // G, D)
        new = {
            "k_codes": torch.zeros(B, H, cap, D * self.bits_k // 8, dtype=torch.uint8, device=dev),
            "k_scale": torch.zeros(B, H, *kmeta, dtype=md, device=dev),
            "k_zero": torch.zeros(B, H, *kmeta, dtype=md, device=dev),
            "v_codes": torch.zeros(B, H, cap, D * self.bits_v // 8, dtype=torch.uint8, device=dev),
            "v_scale": torch.zeros(B, H, cap, D // self.v_group, dtype=md, device=dev),
            "v_zero": torch.zeros(B, H, cap, D // self.v_group, dtype=md, device=dev),
        }
        if old is not None:
            for name, t in old.items():
                new[name][:, :, : t.shape[2]] = t
        return new

    def _q_used(self) -> dict:
        """Views of the filled part of the quantized buffers."""
        n = self.n_quant
        ng = n if self.k_mode == "per_token" else n // self.G
        return {name: t[:, :, : (ng if name in ("k_scale", "k_zero") else n)] for name, t in self.q.items()}

    def _quant_k(self, x: Tensor, fused: bool):
        if fused:
            return ops.rotate_quantize_pack(x, self.bits_k, self.k_group, self.k_mode, None, self.k_perm,
                                            self.meta_dtype, self.clip_k)
        return ops.quantize_pack(x, self.bits_k, self.k_group, self.k_mode, self.meta_dtype, self.clip_k)

    def _quant_v(self, x: Tensor, fused: bool):
        if fused:
            return ops.rotate_quantize_pack(x, self.bits_v, self.v_group, "per_token", None, self.v_perm,
                                            self.meta_dtype, self.clip_v)
        return ops.quantize_pack(x, self.bits_v, self.v_group, "per_token", self.meta_dtype, self.clip_v)

    def attend(self, q: Tensor, scale: Optional[float] = None, indices: Optional[Tensor] = None) -> Tensor:
        """Attention of the newest Tq tokens' queries q [B, H_q, Tq, D] over everything cached (which must already
        include those Tq tokens); causal among them.  Returns [B, H_q, Tq, D] in q's dtype.
        ``indices`` [B, H_kv, n] (Tq = 1; retrieval, e.g. ``hamming_topk``): attend only those logical positions
        (the order of ``dequantize()``: sinks, quantized, recent; entries < 0 or ≥ seq_len skipped)."""
        if q.dim() != 4 or q.shape[0] != self.B or q.shape[3] != self.D:
            raise ValueError(f"QuantizedKVCache.attend: q must be [B={self.B}, H_q, Tq, D={self.D}], got "
                             f"{tuple(q.shape)}")
        if q.shape[1] % self.H:
            raise ValueError(f"QuantizedKVCache.attend: the query head count ({q.shape[1]}) must be a multiple of "
                             f"the KV head count ({self.H})")
        if q.device != self.device:
            raise ValueError(f"QuantizedKVCache.attend: q is on {q.device}, the cache is on {self.device}")
        if q.shape[2] > min(self.row_lens):
            raise ValueError(f"QuantizedKVCache.attend: {q.shape[2]} query tokens but only {min(self.row_lens)} "
                             "cached; append the new keys/values first")
        qq = q.to(self.dtype)
        out = ops.quant_decode_attention(
            qq, self.q["k_codes"], self.q["k_scale"], self.q["k_zero"], self.q["v_codes"], self.q["v_scale"],
            self.q["v_zero"], self.k_fp, self.v_fp, self._lens, self.bits_k, self.bits_v, self.k_group, self.v_group,
            scale, self.rotate_k, self.rotate_v, self.k_perm, self.v_perm, self.k_mode, indices, self.qk_int8)
        return out.to(q.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(k, v) [B, H_kv, N, D] in full precision (``dtype``, default the cache's), original (unrotated) space, in
        the cache's logical order (sinks, then quantized, then recent tokens) — the order attention uses for its
        causal rule.  Rows of unequal length (a left-padded prompt): ``dequantize_row``."""
        if self._short is not None:
            raise ValueError(f"QuantizedKVCache.dequantize: the rows hold different lengths {self.row_lens}; use "
                             "dequantize_row(b)")
        rows = [self.dequantize_row(b, dtype) for b in range(self.B)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def dequantize_row(self, b: int, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(k, v) [H_kv, N_b, D] of row b, as ``dequantize``."""
        if not 0 <= b < self.B:
            raise ValueError(f"QuantizedKVCache.dequantize_row: row {b} is not in [0, {self.B})")
        k, v = ref.gather_kv(self.q["k_codes"], self.q["k_scale"], self.q["k_zero"], self.q["v_codes"],
                             self.q["v_scale"], self.q["v_zero"], self.k_fp, self.v_fp, self._lens.cpu(),
                             self.bits_k, self.bits_v, self.k_group, self.v_group, b, dtype=torch.float32,
                             k_mode=self.k_mode)
        if self.rotate_k:
            k = _unrotate(k, self.k_perm)
        if self.rotate_v:
            v = _unrotate(v, self.v_perm)
        return k.to(dtype or self.dtype), v.to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the data the cache holds (codes, scales/zeros, full-precision sinks and recent tokens)."""
        def per_tok(t):
            return t.shape[-1] * t.element_size() * self.B * self.H
        nq = self.n_quant
        b = (per_tok(self.q["k_codes"]) + per_tok(self.q["v_codes"]) + 2 * per_tok(self.q["v_scale"])) * nq
        b += 2 * per_tok(self.q["k_scale"]) * (nq if self.k_mode == "per_token" else nq // self.G)
        b += 2 * per_tok(self.k_fp) // self.B * (self.B * self.n_sink + sum(self._row_res()))
        return b

    @property
    def nbytes_allocated(self) -> int:
        ts = list(self.q.values()) + [self.k_fp, self.v_fp]
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def effective_bits(self) -> float:
        n = sum(self.row_lens)
        return self.nbytes * 8 / (2 * self.H * n * self.D) if n else 0.0


def _unrotate(x: Tensor, perm: Optional[Tensor]) -> Tensor:
    y = ops.fwht(x)
    if perm is not None:
        out = torch.empty_like(y)
        out[..., perm] = y
        y = out
    return y
