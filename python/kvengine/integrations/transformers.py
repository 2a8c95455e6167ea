"""transformers integration: a compressed KV cache and the ``"kvengine"`` attention implementation.

Usage::

    from kvengine.integrations.transformers import KVEngineCache   # registers "kvengine" on import
    model.set_attn_implementation("kvengine")
    cache = KVEngineCache(model.config, bits=2, group_size=32, residual=128, sinks=4, rotate=True)
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)   # past_key_values=cache before transformers 5.24

    # or: a per-layer plan measured on calibration text under a bit budget (kvengine.calibrate)
    plan = kvengine.calibrate(model, calibration_text, budget_bits=2.5, tokenizer=tok)
    cache = KVEngineCache(model.config, plan=plan)

How a layer runs with ``attn_implementation="kvengine"`` and a ``KVEngineCache``:

* prefill (the layer's cache is empty): full-precision attention over the prompt (torch SDPA with the causal/padding
  mask), then ONE bulk ``QuantizedKVCache.append`` of the prompt's keys/values (fused rotate + quantize + pack);
* decode (cache non-empty): the new tokens are appended and their queries attend the packed cache with the fused
  ``quant_decode_attention`` op; a chunk of more than 8 new tokens is processed 8 at a time (append, attend), so each
  query always sees exactly what a token-by-token decode would.  Nothing is ever dequantized on this path.

With any other cache (e.g. a plain ``DynamicCache``), or for layers the cache keeps in full precision (sliding-window
layers of Gemma-style models), the ``"kvengine"`` attention is plain SDPA: the usual fp semantics.

The transformers ``Cache`` / ``CacheLayerMixin`` API used here is the one of transformers 4.56 … 5.x.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..cache import QuantizedKVCache
from ._hf import EditableLayerMixin, check_cached_padding, real_tokens

try:
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvengine.integrations.transformers needs transformers>=4.56,<5.40 (the Cache/CacheLayerMixin and "
        "AttentionInterface APIs); install with: pip install 'transformers>=4.56,<5.40' gguf accelerate") from e

ATTN_NAME = "kvengine"
MAX_DECODE_CHUNK = 8  # the fused decode kernel's query tile (Tq <= 8)
_TAG = "_kvengine_layer"
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


# ---- plan (calibration result) ---------------------------------------------------------------------------------------
def _load_plan(plan) -> Optional[dict]:
    if plan is None:
        return None
    from ..autoconfig import AutoPlan, is_auto_plan

    if isinstance(plan, AutoPlan):
        return plan.to_dict()
    if is_auto_plan(plan) and isinstance(plan, (str, os.PathLike)):
        return AutoPlan.load(os.fspath(plan)).to_dict()
    if isinstance(plan, (str, os.PathLike)):
        from ..calibration import load_plan

        return load_plan(plan)
    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    if isinstance(plan, dict):
        return plan
    raise TypeError(f"KVEngineCache: plan must be a dict, a CalibrationPlan or a path, got {type(plan).__name__}")


# ---- one layer ----------------------------------------------------------------------------------------------------------
class KVEngineLayer(EditableLayerMixin, CacheLayerMixin):
    """One attention layer's cache: a packed ``QuantizedKVCache`` (created on the first update, when batch size,
    head count, head dim, dtype and device are known)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "KVEngineCache", layer_idx: int, qkw: dict, k_perm: Optional[Tensor] = None,
                 v_perm: Optional[Tensor] = None, sink_detect: Optional[dict] = None):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.qkw = qkw
        self.k_perm, self.v_perm = k_perm, v_perm
        self.sink_detect = sink_detect
        self._qcache: Optional[QuantizedKVCache] = None
        self.cumulative_length = 0
        self._pending: Optional[tuple[Tensor, Tensor]] = None
        self._prefill: Optional[tuple[Tensor, Tensor]] = None  # the prompt, appended once its padding mask is known

    @property
    def qcache(self) -> Optional[QuantizedKVCache]:
        """The layer's packed cache (a prompt not yet attended — bulk loading through ``update`` alone — is
        appended first, unpadded)."""
        if self._prefill is not None:
            self.commit_prefill(None)
        return self._qcache

    def __repr__(self):
        q = self.qkw
        return (f"KVEngineLayer(bits_k={q['bits_k']}, bits_v={q['bits_v']}, G={q['group_size']}, R={q['residual']}, "
                f"sinks={q['sinks']}, rotate={q['rotate']}, len={self.cumulative_length})")

    # -- CacheLayerMixin API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        dtype = key_states.dtype if key_states.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        self._qcache = QuantizedKVCache(H, D, batch_size=B, dtype=dtype, device=key_states.device, k_perm=self.k_perm,
                                        v_perm=self.v_perm, **self.qkw)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            raise RuntimeError("KVEngineCache: the previous update of this layer was never attended — the model's "
                               "attention must be the 'kvengine' implementation (model.set_attn_implementation"
                               "('kvengine'))")
        T = key_states.shape[-2]
        k, v = key_states.to(self.qcache.dtype), value_states.to(self.qcache.dtype)
        if not self._owner._kvengine_attention_active():
            # Some other attention implementation will read full keys/values: serve it (slow, dequantizes).
            _warn_once("dequant", "KVEngineCache is used without attn_implementation='kvengine': every step "
                       "dequantizes the whole cache. Call model.set_attn_implementation('kvengine').")
            self.qcache.append(k, v, self._sink_mask(k) if self.cumulative_length == 0 else None)
            self.cumulative_length += T
            kd, vd = self.qcache.dequantize()
            return kd.to(key_states.dtype), vd.to(value_states.dtype)
        if self.cumulative_length == 0:
            # prefill: attention over the prompt runs in full precision (SDPA); the prompt is then appended in one
            # bulk call by the attention, which knows the padding mask (commit_prefill)
            self._prefill = (k, v)
            mode = "prefill"
        else:
            self._pending = (k, v)
            mode = "decode"
        self.cumulative_length += T
        setattr(key_states, _TAG, (self, mode))
        return key_states, value_states

    def commit_prefill(self, valid: Optional[Tensor]) -> None:
        """Append the prompt (one bulk call): ``valid`` [B, T] marks the real tokens of a left-padded batch (None:
        all real)."""
        k, v = self._prefill
        self._prefill = None
        if valid is not None and not bool(valid.all()):
            if self.sink_detect:
                _warn_once("pad_sinks", "KVEngineCache: extra attention-sink detection is skipped for a padded batch "
                           "(each row keeps its first tokens as sinks)")
            self._qcache.append(k, v, valid=valid)
        else:
            self._qcache.append(k, v, self._sink_mask(k))

    def _sink_mask(self, k: Tensor) -> Optional[Tensor]:
        """Extra attention sinks among the prompt's tokens (beyond the first ``sinks``), by massive key activations
        as the calibration plan configured (None: only the first tokens)."""
        sd = self.sink_detect
        if not sd or k.shape[-2] <= 1:
            return None
        from ..cache import detect_sinks

        m = detect_sinks(k, top=int(sd.get("top", 4)), min_ratio=float(sd.get("min_ratio", 4.0)),
                         exclude_last=int(self.qkw["residual"]))
        return m if bool(m.any()) else None

    def attend_pending(self, query: Tensor, scale: Optional[float]) -> Tensor:
        """Append the pending new tokens and attend their queries over the packed cache, ≤ 8 tokens at a time.
        query [B, Hq, T, D] -> [B, Hq, T, D]."""
        if self._pending is None:
            raise RuntimeError("KVEngineCache: attention called without a preceding cache update for this layer")
        k, v = self._pending
        self._pending = None
        T = k.shape[-2]
        if query.shape[-2] != T:
            raise ValueError(f"KVEngineCache: {query.shape[-2]} queries for {T} new keys")
        outs = []
        for s in range(0, T, MAX_DECODE_CHUNK):
            e = min(T, s + MAX_DECODE_CHUNK)
            self.qcache.append(k[:, :, s:e], v[:, :, s:e])
            outs.append(self.qcache.attend(query[:, :, s:e], scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._qcache = None
        self._pending = self._prefill = None
        self.is_initialized = False
        self.cumulative_length = 0

    def offload(self):
        pass

    def prefetch(self):
        pass

    # -- EditableLayerMixin hooks: beam search, batch selection, crop
    def _select_rows(self, index) -> None:
        self.qcache.select_rows(index)

    def _truncate(self, n: int) -> None:
        self.qcache.truncate(n)

    def _croppable(self) -> bool:
        return int(self.qkw["residual"]) > 0

    def _batch_size(self) -> int:
        return self.qcache.B

    # -- memory
    @property
    def nbytes(self) -> int:
        return self.qcache.nbytes if self.qcache is not None else 0


# ---- the cache ----------------------------------------------------------------------------------------------------------
def _fp_layer_nbytes(layer) -> int:
    k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
    if k is None or not isinstance(k, Tensor):
        return 0
    return k.numel() * k.element_size() + v.numel() * v.element_size()


class KVEngineCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are packed 2/4-bit ``QuantizedKVCache`` (KIVI layout,
    FWHT rotation, attention sinks).  Use with ``attn_implementation="kvengine"``.

    Args:
        config: the model's config (its text/decoder config gives the layer types).
        bits: bits for keys and values (2 or 4); ``bits_k``/``bits_v`` override per tensor.
        group_size: tokens per key group (per-channel scale/zero) and channels per value group (capped at head_dim).
        residual: full-precision recent window (tokens).
        sinks: number of first tokens kept in full precision.
        rotate: "auto" (default) / True / False / 'k' / 'v' — FWHT rotation of keys and/or values.  "auto" follows a
            per-layer auto plan when one is given, else rotates the values only (``kvengine.cache.DEFAULT_ROTATE``:
            never much worse than the best choice on the models measured; rotating keys can hurt badly).
        plan: either an automatic per-layer plan (``kvengine.calibrate(model, text, budget_bits=...)``: an
            ``AutoPlan``, its dict or its JSON path) — bits, group size, rotation, key channel order, residual and
            sinks per layer, overriding those arguments — or a permutation/sink plan
            (``kvengine.calibration.calibrate``: dict, ``CalibrationPlan`` or path) — per-layer key/value channel
            permutations, the sink count, runtime sink detection.
        sliding: what to do with sliding-window layers: "fp" (default — full-precision sliding window cache, a note is
            recorded in ``self.notes``) or "error".
        fp_layers: layer indices to keep in full precision (plain ``DynamicLayer``).
        v_group, meta_dtype: passed to ``QuantizedKVCache``.
        clip: "auto" (default) / True / False / 'k' / 'v' — MSE range search of the key and/or value groups
            (``kvengine.cache.DEFAULT_CLIP``: keys only, measured); min/max quantization with False.  An auto plan's
            layers use "auto".
        k_mode: "per_channel" (default, KIVI: key scale/zero per channel over groups of ``group_size`` tokens) or
            "per_token" (key scale/zero per token over groups of min(group_size, head_dim) channels, like the
            values).  An auto plan sets it per layer.
        qk_int8: score the packed keys with int8 queries (CPU, per-channel keys of <= 4 bits; see
            ``ops.quant_decode_attention``): faster decode, slightly different numerics.  Default False.
    """

    def __init__(self, config, bits: int = 2, bits_k: Optional[int] = None, bits_v: Optional[int] = None,
                 group_size: int = 32, residual: int = 128, sinks: int = 4, rotate: Union[bool, str] = "auto",
                 plan: Union[None, dict, str, Any] = None, sliding: str = "fp", fp_layers=(),
                 v_group: Optional[int] = None, meta_dtype: Optional[torch.dtype] = None,
                 clip: Union[bool, str] = "auto", k_mode: str = "per_channel", qk_int8: bool = False):
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self._config = text_config
        plan = _load_plan(plan)
        self.plan = plan
        n_layers = text_config.num_hidden_layers
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
        if getattr(text_config, "layer_types", None) is None and getattr(text_config, "sliding_window", None):
            # older configs: sliding_window set for every layer (Mistral-style) unless use_sliding_window is False
            if getattr(text_config, "use_sliding_window", True):
                layer_types = ["sliding_attention"] * n_layers
        auto = None
        if plan is not None and "layers" in plan and "budget_bits" in plan:
            from ..autoconfig import AutoPlan

            auto = AutoPlan.from_dict(plan)
            if rotate != "auto":
                raise ValueError(f"KVEngineCache: an auto plan sets the rotation of every layer; leave rotate='auto' "
                                 f"(got rotate={rotate!r})")
            if clip != "auto" or k_mode != "per_channel":
                raise ValueError(f"KVEngineCache: an auto plan sets the quantizer of every layer; leave clip='auto' "
                                 f"and k_mode='per_channel' (got clip={clip!r}, k_mode={k_mode!r})")
            n_full = sum(lt == "full_attention" for lt in layer_types)
            if len(auto.layers) not in (n_layers, n_full):
                raise ValueError(f"KVEngineCache: the auto plan has {len(auto.layers)} layers, the model has "
                                 f"{n_layers} ({n_full} full-attention)")
            plan = None
        if plan is not None:
            if plan.get("num_layers") not in (None, n_layers):
                raise ValueError(f"KVEngineCache: the plan is for {plan.get('num_layers')} layers, the model has "
                                 f"{n_layers}")
            if plan.get("sinks") is not None and sinks is not None:
                sinks = max(int(sinks), int(plan["sinks"]))
        bk = bits if bits_k is None else bits_k
        bv = bits if bits_v is None else bits_v
        qkw = dict(bits_k=bk, bits_v=bv, group_size=group_size, residual=residual, sinks=sinks, rotate=rotate,
                   v_group=v_group, meta_dtype=meta_dtype, clip=clip, k_mode=k_mode, qk_int8=qk_int8)
        # validate the arguments now (a throwaway tiny cache) rather than at the first forward
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        if auto is not None and auto.head_dim != head_dim:
            raise ValueError(f"KVEngineCache: the auto plan is for head_dim {auto.head_dim}, the model has {head_dim}")
        QuantizedKVCache(1, head_dim, **qkw)
        self.config_summary = dict(bits_k=bk, bits_v=bv, group_size=group_size, residual=residual, sinks=sinks,
                                   rotate=rotate, clip=clip, k_mode=k_mode, plan=bool(plan), qk_int8=qk_int8)
        if auto is not None:
            self.config_summary = dict(auto_plan=True, budget_bits=auto.budget_bits,
                                       packed_bits=round(auto.effective_bits, 3), residual=auto.residual,
                                       sinks=auto.sinks, qk_int8=qk_int8)
        self.auto_plan = auto
        from ..cache import _parse_rotate

        rot_k, rot_v = _parse_rotate(rotate)
        self.notes: list[str] = []
        layers = []
        fp_layers = set(fp_layers)
        full_idx = 0  # index among the full-attention layers (an auto plan may list only those)
        for i, lt in enumerate(layer_types):
            if i in fp_layers:
                layers.append(DynamicLayer())
                continue
            if lt == "full_attention" and auto is not None:
                j = i if len(auto.layers) == n_layers else full_idx
                full_idx += 1
                kw = auto.cache_kwargs(j)
                kp = kw.pop("k_perm", None)
                layers.append(KVEngineLayer(self, i, dict(kw, v_group=v_group, meta_dtype=meta_dtype,
                                                          qk_int8=qk_int8), kp, None, None))
                continue
            if lt == "full_attention":
                kp = vp = None
                sd = None
                if plan is not None:
                    kp = _perm(plan, "k_perm", i) if rot_k else None
                    vp = _perm(plan, "v_perm", i) if rot_v else None
                    sd = plan.get("sink_detect")
                layers.append(KVEngineLayer(self, i, qkw, kp, vp, sd))
            elif lt in ("sliding_attention", "chunked_attention"):
                if sliding != "fp":
                    raise NotImplementedError(f"KVEngineCache: layer {i} is a {lt} layer; pass sliding='fp' to keep "
                                              "it in full precision")
                win = getattr(text_config, "sliding_window", None) or getattr(text_config, "attention_chunk_size")
                layers.append(DynamicSlidingWindowLayer(sliding_window=win))
            else:
                raise NotImplementedError(f"KVEngineCache: layer {i} has type '{lt}', which kvengine does not handle")
        n_fp = sum(not isinstance(l, KVEngineLayer) for l in layers)
        if n_fp:
            self.notes.append(f"{n_fp} of {len(layers)} layers (sliding-window or fp_layers) keep a full-precision "
                              "cache; only full-attention layers are compressed")
        super().__init__(layers=layers)

    def _kvengine_attention_active(self) -> bool:
        impl = getattr(self._config, "_attn_implementation", None)
        return impl == ATTN_NAME

    # -- memory accounting
    @property
    def nbytes(self) -> int:
        """Bytes of KV data held (packed codes + scales/zeros + full-precision sinks/recent tokens + fp layers)."""
        return sum(l.nbytes if isinstance(l, KVEngineLayer) else _fp_layer_nbytes(l) for l in self.layers)

    def fp_nbytes(self, dtype_bytes: Optional[int] = None) -> int:
        """Bytes the same tokens would take in an uncompressed cache (the model's dtype, or ``dtype_bytes``)."""
        total = 0
        for l in self.layers:
            if isinstance(l, KVEngineLayer):
                q = l.qcache
                if q is None:
                    continue
                eb = dtype_bytes or torch.empty((), dtype=q.dtype).element_size()
                total += 2 * q.H * sum(q.row_lens) * q.D * eb
            else:
                total += _fp_layer_nbytes(l)
        return total

    @property
    def effective_bits(self) -> float:
        """Average bits per cached K/V element over the compressed layers."""
        bits = el = 0
        for l in self.layers:
            if isinstance(l, KVEngineLayer) and l.qcache is not None and l.qcache.seq_len:
                q = l.qcache
                n = 2 * q.H * sum(q.row_lens) * q.D
                bits += q.effective_bits * n
                el += n
        return bits / el if el else 0.0

    def __repr__(self):
        return f"KVEngineCache({self.config_summary}, layers={len(self.layers)})"


def _perm(plan: dict, name: str, i: int) -> Optional[Tensor]:
    perms = plan.get(name)
    if not perms:
        return None
    p = perms[i]
    return None if p is None else torch.as_tensor(p, dtype=torch.long)


# ---- attention implementation -------------------------------------------------------------------------------------------
def kvengine_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask: Optional[Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               **kwargs) -> tuple[Tensor, None]:
    """The ``"kvengine"`` attention: packed-cache decode for ``KVEngineCache`` layers, SDPA otherwise."""
    tag = getattr(key, _TAG, None)
    if tag is None:  # no KVEngineCache here (plain DynamicCache, fp layer, no cache): full-precision SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    layer, mode = tag
    try:
        delattr(key, _TAG)
    except AttributeError:
        pass
    if mode == "prefill":
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     is_causal=is_causal, **kwargs)
        layer.commit_prefill(real_tokens(attention_mask, key.shape[0], key.shape[-2]))
        return out
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("kvengine attention: logit soft-capping (Gemma-2) is not supported by the packed "
                                  "decode kernel")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("kvengine attention: a sliding-window layer reached the packed cache")
    if dropout:
        raise NotImplementedError("kvengine attention: dropout is not supported in the packed decode path")
    T = query.shape[-2]
    check_cached_padding(attention_mask, key.shape[0], layer.cumulative_length, T, layer.qcache.row_lens,
                         "kvengine attention")
    out = layer.attend_pending(query, scaling)  # [B, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"kvengine"`` in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    AttentionInterface.register(ATTN_NAME, kvengine_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


register()


def cache_kv_stats(cache) -> dict:
    """Bytes held, the fp equivalent and effective bits of any transformers cache (KVEngineCache or fp)."""
    if isinstance(cache, KVEngineCache):
        return {"nbytes": cache.nbytes, "fp_nbytes": cache.fp_nbytes(), "effective_bits": cache.effective_bits,
                "seq_len": cache.get_seq_length()}
    nb = sum(_fp_layer_nbytes(l) for l in getattr(cache, "layers", []))
    return {"nbytes": nb, "fp_nbytes": nb, "effective_bits": None, "seq_len": cache.get_seq_length()}


__all__ = ["KVEngineCache", "KVEngineLayer", "kvengine_attention_forward", "register", "ATTN_NAME",
           "cache_kv_stats"]
