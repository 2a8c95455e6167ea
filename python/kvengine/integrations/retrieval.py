"""transformers integration of hash-based top-k retrieval decode: ``RetrievalCache`` + the ``"kvengine_retrieval"``
attention implementation.

Usage::

    from kvengine.integrations.retrieval import RetrievalCache   # registers "kvengine_retrieval" on import
    model.set_attn_implementation("kvengine_retrieval")
    cache = RetrievalCache(model.config, top_k=128, sinks=4, recent=64)          # random-hyperplane LSH, 128 bits
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)   # past_key_values=cache before transformers 5.24

How a layer runs with ``attn_implementation="kvengine_retrieval"`` and a ``RetrievalCache``:

* prefill (the layer's cache is empty): full-precision attention over the prompt (torch SDPA with the causal mask),
  then ONE bulk append of the prompt's keys/values into the layer's ``kvengine.retrieval.RetrievalAttention`` (all
  prompt keys hashed with one ``hash_encode`` call);
* decode (cache non-empty): the new tokens' keys are appended (hashed once, never again) and each new query attends
  only the ``top_k`` cached tokens closest in Hamming distance (``hamming_topk``; the first ``sinks`` and the last
  ``recent`` tokens are always kept and count toward ``top_k``) with ``sparse_decode_attention`` (exact softmax over
  the selected tokens).  A chunk of several new tokens is processed one query at a time, each restricted to the
  tokens up to its own position, so every query sees exactly what a token-by-token decode would.

``selector="oracle"`` replaces the hash ranking by the true attention weights (softmax of q·k summed over the
query heads of each KV head's group, the same sinks/recent rule, the same sparse attention): the most attention mass
a shared selection of ``top_k`` tokens can keep.  ``selector="oracle_logit"`` ranks by the true logits q·k summed
over the group instead (a product of the heads' weights).  Neither is a perplexity ceiling: on SmolLM2 the trained
hash beats both, and the logit oracle beats the mass oracle although it keeps less mass (README, docs/design.md).

Hashes: ``hashes=None`` (random-hyperplane LSH of ``nbits`` bits, seeded per layer), a list / dict ``{layer:
SpotlightHash}`` (e.g. trained with ``train_layer_hashes``), or a path written by ``save_hashes``.

With any other cache (e.g. ``DynamicCache``) the ``"kvengine_retrieval"`` attention is plain SDPA.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from .. import ops
from ..cache import QuantizedKVCache
from ._hf import EditableLayerMixin, cache_kwargs, check_cached_padding, real_tokens
from ..retrieval import HashCodeCache, RetrievalAttention, SpotlightHash, train_hash

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvengine.integrations.retrieval needs transformers>=4.56,<6 (the Cache/CacheLayerMixin and "
        "AttentionInterface APIs); install with: pip install 'transformers>=4.56,<6' gguf accelerate") from e

ATTN_NAME = "kvengine_retrieval"
HASH_FILE_FORMAT = "kvengine-retrieval-hashes"
_TAG = "_kvengine_retrieval_layer"
_VALID_NBITS = (32, 64, 128, 256)
SELECTORS = ("hash", "oracle", "oracle_logit")
_capture: Optional[dict] = None  # set by capture_qk_all: layer_idx -> (q, k) of the last forward


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _head_dims(config) -> tuple[int, int, int, int]:
    c = _text_config(config)
    Hq, Hkv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // Hq
    return c.num_hidden_layers, Hq, Hkv, D


# ---- hash persistence ---------------------------------------------------------------------------------------------------
def save_hashes(hashes, path) -> None:
    """Save per-layer hashes (list or ``{layer: SpotlightHash}``) to one file (``load_hashes`` reads it back)."""
    items = hashes.items() if isinstance(hashes, dict) else enumerate(hashes)
    d = {"format": HASH_FILE_FORMAT, "version": 1,
         "layers": {int(i): h.state_dict() for i, h in items if h is not None}}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    torch.save(d, path)


def load_hashes(path) -> dict[int, SpotlightHash]:
    """Per-layer hashes written by ``save_hashes``: ``{layer: SpotlightHash}``."""
    d = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or d.get("format") != HASH_FILE_FORMAT:
        raise ValueError(f"RetrievalCache: '{path}' is not a kvengine retrieval hash file (save_hashes)")
    return {int(i): SpotlightHash.from_state_dict(sd) for i, sd in d["layers"].items()}


def lsh_hashes(config, nbits: int = 128, seed: int = 0) -> dict[int, SpotlightHash]:
    """Random-hyperplane LSH for every layer (layer i seeded with ``seed + i``)."""
    if nbits not in _VALID_NBITS:
        raise ValueError(f"RetrievalCache: nbits must be one of {_VALID_NBITS}, got {nbits}")
    L, _, Hkv, D = _head_dims(config)
    return {i: SpotlightHash.random(Hkv, D, nbits, generator=torch.Generator().manual_seed(seed + i))
            for i in range(L)}


# ---- one layer ------------------------------------------------------------------------------------------------------------
class RetrievalLayer(EditableLayerMixin, CacheLayerMixin):
    """One attention layer: full-precision K/V + packed key codes (``RetrievalAttention``), created on the first
    update (when batch size, dtype and device are known)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "RetrievalCache", layer_idx: int, hasher: Optional[SpotlightHash], top_k: int,
                 sinks: int, recent: int, selector: str, quant: Optional[dict] = None, dense: bool = False):
        super().__init__()
        self.dense = dense  # every decoded query attends its whole context (no selection) in this layer
        self.quant = quant  # QuantizedKVCache kwargs: K/V held packed, attended sparsely in packed form
        self._codes: Optional[HashCodeCache] = None
        self._qc: Optional[QuantizedKVCache] = None
        self._ra: Optional[RetrievalAttention] = None
        self._prefill: Optional[tuple[Tensor, Tensor]] = None  # the prompt, appended once its padding mask is known
        self._owner = owner
        self.layer_idx = layer_idx
        self.hasher = hasher
        self.top_k, self.sinks, self.recent = top_k, sinks, recent
        self.selector = selector
        self.cumulative_length = 0
        self._pending = False
        self.selected_tokens = 0  # Σ over decoded queries of the tokens attended
        self.context_tokens = 0   # Σ over decoded queries of the tokens visible (causal context)

    def __repr__(self):
        sel = "dense" if self.dense else f"top_k={self.top_k}, sinks={self.sinks}, recent={self.recent}, " \
            f"selector={self.selector}"
        return f"RetrievalLayer({sel}, len={self.cumulative_length})"

    # the stores (a prompt not yet attended — bulk loading through ``update`` alone — is appended first, unpadded)
    @property
    def ra(self) -> Optional[RetrievalAttention]:
        self._flush_prefill()
        return self._ra

    @property
    def qc(self) -> Optional[QuantizedKVCache]:
        self._flush_prefill()
        return self._qc

    @property
    def codes(self) -> Optional[HashCodeCache]:
        self._flush_prefill()
        return self._codes

    def _flush_prefill(self) -> None:
        if self._prefill is not None:
            self.commit_prefill(None)

    def commit_prefill(self, valid: Optional[Tensor]) -> None:
        """Append the prompt (keys hashed in one call); ``valid`` [B, T]: the real tokens of a left-padded batch."""
        k, v = self._prefill
        self._prefill = None
        if self._qc is not None:
            self._codes.append(k, valid)
            self._qc.append(k, v, valid=valid)
        else:
            self._ra.append(k, v, valid)

    # -- CacheLayerMixin API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, T, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.hasher.num_heads != H or self.hasher.head_dim != D:
            raise ValueError(f"RetrievalCache: layer {self.layer_idx}'s hash is for {self.hasher.num_heads} KV heads "
                             f"of dim {self.hasher.head_dim}, the model has {H} of dim {D}")
        self.hasher = self.hasher.to(key_states.device)
        if self.quant is not None:
            self._codes = HashCodeCache(self.hasher, B, key_states.device, capacity=max(1024, T))
            self._qc = QuantizedKVCache(H, D, batch_size=B, dtype=key_states.dtype, device=key_states.device,
                                        **self.quant)
            self.is_initialized = True
            return
        self._ra = RetrievalAttention(self.hasher, H, D, top_k=self.top_k, sinks=self.sinks, recent=self.recent,
                                      batch_size=B, dtype=key_states.dtype, device=key_states.device,
                                      capacity=max(1024, T))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending:
            raise RuntimeError("RetrievalCache: the previous update of this layer was never attended — the model's "
                               f"attention must be '{ATTN_NAME}' (model.set_attn_implementation('{ATTN_NAME}'))")
        if not self._owner._retrieval_attention_active():
            raise RuntimeError(f"RetrievalCache needs attn_implementation='{ATTN_NAME}' (call "
                               f"model.set_attn_implementation('{ATTN_NAME}')); another attention would attend "
                               "every cached token and silently skip the top-k selection")
        T = key_states.shape[-2]
        first = self.cumulative_length == 0
        if first:
            self._prefill = (key_states, value_states)  # appended by the attention, which sees the padding mask
        elif self.qc is not None:
            self.codes.append(key_states)
            self.qc.append(key_states, value_states)
        else:
            self.ra.append(key_states, value_states)
        self.cumulative_length += T
        if first:
            mode = "prefill"  # SDPA over the prompt, then commit_prefill
        else:
            self._pending = True
            mode = "decode"
        setattr(key_states, _TAG, (self, mode))
        return key_states, value_states

    def _oracle_scores(self, q: Tensor, n0: int, scale: float) -> Tensor:
        """True attention weight (``oracle``) or logit (``oracle_logit``) of every cached token for each new query,
        summed over each KV head's query group: q [B, Hq, T, D] (the queries at positions n0 .. n0+T-1) ->
        [B, Hkv, T, n0+T] (0 / -inf beyond a query's causal context)."""
        B, Hq, T, D = q.shape
        n = n0 + T
        k = self.ra.k[:, :, :n].float()  # [B, Hkv, n, D]
        Hkv = k.shape[1]
        qg = q.float().reshape(B, Hkv, Hq // Hkv * T, D)
        s = (qg @ k.transpose(-1, -2) * scale).reshape(B, Hkv, Hq // Hkv, T, n)
        future = torch.arange(n, device=q.device)[None, :] > torch.arange(n0, n, device=q.device)[:, None]
        s = s.masked_fill(future, float("-inf"))
        return s.sum(2) if self.selector == "oracle_logit" else torch.softmax(s, -1).sum(2)

    def _oracle_select(self, p: Tensor, n0: int, kk: int, sinks: int, recent: int) -> Tensor:
        """Top-kk positions by ``p`` [B, Hkv, T, n] with the first ``sinks`` and each query's last ``recent``
        positions forced; positions beyond a query's context rank last.  -> int64 [B, Hkv, T, kk]."""
        T, n = p.shape[-2], p.shape[-1]
        j = torch.arange(n, device=p.device)[None, :]
        end = torch.arange(n0 + 1, n + 1, device=p.device)[:, None]  # query t sees [0, end_t)
        p = p.masked_fill((j < sinks) | ((j >= end - recent) & (j < end)), float("inf"))
        p = p.masked_fill(j >= end, float("-inf"))
        return p.topk(kk, -1).indices

    def attend_pending(self, query: Tensor, scale: Optional[float]) -> Tensor:
        """The new tokens (already appended) attend their top-k; query t of the chunk sees only the tokens up to its
        own position (what a token-by-token decode gives).  query [B, Hq, T, D] -> [B, Hq, T, D]."""
        if not self._pending:
            raise RuntimeError("RetrievalCache: attention called without a preceding cache update for this layer")
        self._pending = False
        if self.qc is not None:
            return self._attend_packed(query, scale)
        ra = self.ra
        B, Hq, T, D = query.shape
        n = ra.seq_len
        n0 = n - T
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        q = query.to(ra.k.dtype)
        kk = min(self.top_k, n)
        sinks = min(self.sinks, kk)
        recent = min(self.recent, kk - sinks)
        K, V, codes = ra.k, ra.v, ra.codes.codes  # [B, Hkv, n, *] views
        if self.dense:
            pass
        elif self.selector == "hash":
            qcodes = self.hasher.encode_queries(q)  # [B, Hq, T, W], one call for the chunk
        else:
            pscore = self._oracle_scores(q, n0, scale)  # [B, Hkv, T, n]
        lens = torch.arange(n0 + 1, n + 1, dtype=torch.int32, device=q.device)  # context of each new query
        if ra.row_lens != [n] * B:
            return self._attend_ragged(q, K, V, codes, ra.row_lens, scale, query.dtype)
        if B == 1:
            # the T queries as a batch of T sequences over the same (expanded, not copied) cache, each cut to its
            # own context by seq_lens: selection and attention exactly as T single-token decode steps
            if self.dense:
                idx = self._dense_select(T, K.shape[1], n)
            elif self.selector == "hash":
                idx, _ = ops.hamming_topk(qcodes[0].transpose(0, 1), codes.expand(T, -1, -1, -1), kk, lens,
                                          keep=(sinks, recent))
            else:
                idx = self._oracle_select(pscore, n0, kk, sinks, recent)[0].transpose(0, 1)
            out = ops.sparse_decode_attention(q[0].transpose(0, 1).unsqueeze(2), K.expand(T, -1, -1, -1),
                                              V.expand(T, -1, -1, -1), idx, lens, scale)  # [T, Hq, 1, D]
            out = out.squeeze(2).transpose(0, 1).unsqueeze(0)
        else:
            outs = []
            for t in range(T):
                m = n0 + t + 1
                if self.dense:
                    it = self._dense_select(B, K.shape[1], m)
                elif self.selector == "hash":
                    it = self._hash_select(qcodes[:, :, t], codes, m)
                else:
                    kt, st, rt = self._budget(m)
                    it = self._oracle_select(pscore[:, :, t : t + 1, :m], m - 1, kt, st, rt)[:, :, 0]
                outs.append(ops.sparse_decode_attention(q[:, :, t : t + 1], K[:, :, :m], V[:, :, :m], it, None,
                                                        scale))
            out = torch.cat(outs, 2)
        self._count(lens.expand(B, -1))
        return out.to(query.dtype)

    def _attend_ragged(self, q: Tensor, K: Tensor, V: Tensor, codes: Tensor, row_lens: list, scale: float,
                       dtype) -> Tensor:
        """attend_pending when the rows hold different lengths (a left-padded prompt): query t of row b sees that
        row's first row_lens[b] - T + t + 1 tokens (the ops' per-row ``seq_lens``)."""
        if self.selector != "hash" and not self.dense:
            raise NotImplementedError(f"RetrievalCache: selector='{self.selector}' does not support padded batches")
        T = q.shape[2]
        ctx = torch.tensor(row_lens, dtype=torch.int32, device=q.device)[:, None] - T + 1 + \
            torch.arange(T, dtype=torch.int32, device=q.device)  # [B, T]
        qcodes = None if self.dense else self.hasher.encode_queries(q)
        outs = []
        for t in range(T):
            m = int(ctx[:, t].max())
            if self.dense:
                it = self._dense_select(q.shape[0], K.shape[1], m, ctx[:, t])
            else:
                it = self._hash_select(qcodes[:, :, t], codes, m, ctx[:, t])
            outs.append(ops.sparse_decode_attention(q[:, :, t : t + 1], K[:, :, :m], V[:, :, :m], it, ctx[:, t],
                                                    scale))
        self._count(ctx)
        return torch.cat(outs, 2).to(dtype)

    def _budget(self, m: int) -> tuple[int, int, int]:
        """(top-k, sinks, recent) for a query that sees m tokens."""
        kt = min(self.top_k, m)
        st = min(self.sinks, kt)
        return kt, st, min(self.recent, kt - st)

    def _hash_select(self, qcodes: Tensor, codes: Tensor, m: int, seq_lens: Optional[Tensor] = None) -> Tensor:
        """Top-k positions (sinks and recent kept) of one query per sequence (qcodes [B, Hq, W]) among the first m
        cached tokens (or the first seq_lens[b] of row b; a shorter row keeps its own sinks/recent and, below top_k
        tokens, all of them — what it gets alone)."""
        kt, st, rt = self._budget(m)
        return ops.hamming_topk(qcodes, codes[:, :, :m], kt, seq_lens, keep=(st, rt))[0]

    def _dense_select(self, B: int, Hkv: int, m: int, seq_lens: Optional[Tensor] = None) -> Tensor:
        """Every position of the first m (or of the first seq_lens[b] of row b, the rest -1): [B, Hkv, m] — a dense
        layer's "selection"."""
        idx = torch.arange(m, dtype=torch.int32, device=self.device)
        if seq_lens is None:
            return idx.expand(B, Hkv, m)
        idx = torch.where(idx[None, :] < seq_lens.to(idx.device)[:, None], idx, -1)  # [B, m]
        return idx[:, None].expand(B, Hkv, m)

    def _count(self, ctx: Tensor) -> None:
        """ctx [B, T]: the context length of each decoded query."""
        self.selected_tokens += int(ctx.sum() if self.dense else ctx.clamp(max=self.top_k).sum())
        self.context_tokens += int(ctx.sum())

    def _attend_packed(self, query: Tensor, scale: Optional[float]) -> Tensor:
        """attend_pending over the packed cache: per new query its hash top-k over its own causal context, then
        ``quant_decode_attention(indices=...)`` (the selected tokens dequantized on the fly; logical positions are
        time positions because no extra sinks are ever marked)."""
        B, Hq, T, D = query.shape
        q = query.to(self.qc.dtype)
        qcodes = None if self.dense else self.hasher.encode_queries(q)  # [B, Hq, T, W]
        codes = self.codes.codes
        rl = self.qc.row_lens
        ctx = torch.tensor(rl)[:, None] - T + 1 + torch.arange(T)  # [B, T]: the context of each new query
        lens = None if len(set(rl)) == 1 else ctx.to(torch.int32).to(q.device)
        outs = []
        for t in range(T):
            m = int(ctx[:, t].max())
            if self.dense:
                sel = self._dense_select(B, self.qc.H, m, None if lens is None else lens[:, t])
            else:
                sel = self._hash_select(qcodes[:, :, t], codes, m, None if lens is None else lens[:, t])
            outs.append(self.qc.attend(q[:, :, t : t + 1], scale, indices=sel))
        self._count(ctx)
        return torch.cat(outs, 2).to(query.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._ra = self._codes = self._qc = None
        self._prefill = None
        self._pending = False
        self.is_initialized = False
        self.cumulative_length = 0
        self.selected_tokens = self.context_tokens = 0

    def offload(self):
        pass

    def prefetch(self):
        pass

    # -- EditableLayerMixin hooks: beam search, batch selection, crop
    def _select_rows(self, index) -> None:
        if self.qc is not None:
            self.qc.select_rows(index)
            self.codes.select_rows(index)
        else:
            self.ra.select_rows(index)

    def _truncate(self, n: int) -> None:
        if self.qc is not None:
            self.qc.truncate(n)  # raises (nothing changed) if the tokens are already quantized
            self.codes.truncate(n)
        else:
            self.ra.truncate(n)

    def _croppable(self) -> bool:
        default = QuantizedKVCache.__init__.__kwdefaults__["residual"]
        return self.quant is None or int(self.quant.get("residual", default)) > 0

    def _batch_size(self) -> int:
        return self.qc.B if self.qc is not None else self.ra.k.shape[0]

    @property
    def nbytes(self) -> int:
        """K/V (model dtype, or packed) + key codes held."""
        if self.qc is not None:
            return self.qc.nbytes + self.codes.nbytes
        ra = self.ra
        if ra is None:
            return 0
        return 2 * ra.k.numel() * ra.k.element_size() + ra.codes.nbytes


# ---- the cache ------------------------------------------------------------------------------------------------------------
class RetrievalCache(Cache):
    """A transformers ``Cache`` whose layers decode with hash-based top-k attention (``kvengine.retrieval``).
    Use with ``attn_implementation="kvengine_retrieval"``.

    Args:
        config: the model's config.
        top_k: tokens each decoded query attends (sinks and the recent window included).
        sinks: first tokens always attended.
        recent: last tokens always attended (the query's own token included).
        hashes: None (LSH of ``nbits`` bits, seeded ``seed + layer``), a list / dict ``{layer: SpotlightHash}`` for
            every layer, or a path written by ``save_hashes``.
        selector: "hash" (default), "oracle" (the top_k tokens of most attention weight summed over each KV head's
            query group) or "oracle_logit" (of largest logit summed over the group); oracles ignore ``hashes`` and
            are references, not perplexity ceilings (README).
        quant: None (K/V in the model's dtype) or ``QuantizedKVCache`` keyword arguments (e.g. ``dict(bits_k=2,
            bits_v=2, group_size=64, residual=128)``): K/V held packed (INT2/INT4 ...) and the selected tokens
            attended in packed form (``quant_decode_attention(indices=...)``); hash selector only.
        dense_layers: layers whose decoded queries attend their whole context (no top-k selection; such a layer
            needs no hash), e.g. ``(0,)``: SmolLM2's layer 0 attends diffusely (its top-64 holds ~30 % of the
            attention mass) and costs most of the top-k PPL loss there (README).
    """

    def __init__(self, config, top_k: int = 128, sinks: int = 4, recent: int = 64,
                 hashes: Union[None, str, os.PathLike, list, dict] = None, nbits: int = 128, seed: int = 0,
                 selector: str = "hash", quant: Optional[dict] = None, dense_layers=()):
        text_config = _text_config(config)
        self._config = text_config
        L, Hq, Hkv, D = _head_dims(text_config)
        top_k, sinks, recent = int(top_k), int(sinks), int(recent)
        if top_k < 1:
            raise ValueError(f"RetrievalCache: top_k must be >= 1, got {top_k}")
        if sinks < 0 or recent < 0:
            raise ValueError(f"RetrievalCache: sinks ({sinks}) and recent ({recent}) must be >= 0")
        if sinks + recent > top_k:
            raise ValueError(f"RetrievalCache: sinks + recent ({sinks} + {recent}) must be <= top_k ({top_k}): the "
                             "always-kept tokens count toward top_k")
        if selector not in SELECTORS:
            raise ValueError(f"RetrievalCache: selector must be one of {SELECTORS}, got '{selector}'")
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * L
        bad = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        if bad or (getattr(text_config, "layer_types", None) is None and getattr(text_config, "sliding_window", None)
                   and getattr(text_config, "use_sliding_window", True)):
            raise NotImplementedError("RetrievalCache: only models whose layers are all full attention are supported "
                                      f"(layers {bad[:8] or 'all'} use sliding/chunked attention)")
        dense = sorted({int(i) for i in dense_layers})
        if any(i < 0 or i >= L for i in dense):
            raise ValueError(f"RetrievalCache: dense_layers {dense} must be layer indices in [0, {L})")
        if isinstance(hashes, (str, os.PathLike)):
            hashes = load_hashes(hashes)
        if hashes is None:
            hashes = lsh_hashes(text_config, nbits, seed)
        elif isinstance(hashes, (list, tuple)):
            hashes = dict(enumerate(hashes))
        if not isinstance(hashes, dict):
            raise TypeError(f"RetrievalCache: hashes must be None, a path, a list or a dict, got "
                            f"{type(hashes).__name__}")
        hashes = dict(hashes)
        fill = [i for i in dense if hashes.get(i) is None]
        if fill:  # a dense layer never ranks by its codes: the LSH keeps its store the same as the others'
            lsh = lsh_hashes(text_config, nbits, seed)
            hashes.update({i: lsh[i] for i in fill})
        missing = [i for i in range(L) if hashes.get(i) is None]
        if missing:
            raise ValueError(f"RetrievalCache: no hash for layers {missing[:8]} (the model has {L} layers)")
        for i in range(L):
            h = hashes[i]
            if h.num_heads != Hkv or h.head_dim != D:
                raise ValueError(f"RetrievalCache: layer {i}'s hash is for {h.num_heads} KV heads of dim "
                                 f"{h.head_dim}, the model has {Hkv} of dim {D}")
            if h.nbits * (Hq // Hkv) > 8192:
                raise ValueError(f"RetrievalCache: (Hq/Hkv)·nbits = {h.nbits * (Hq // Hkv)} exceeds 8192")
        if quant is not None:
            if selector != "hash":
                raise ValueError("RetrievalCache: a packed cache (quant=...) supports selector='hash' only")
            quant = dict(quant)
            bad = sorted(set(quant) & {"batch_size", "dtype", "device"})
            if bad:
                raise ValueError(f"RetrievalCache: quant may not set {bad} (they come from the model's tensors)")
            QuantizedKVCache(Hkv, D, **quant)  # validate now, not at the first forward
        self.config_summary = dict(top_k=top_k, sinks=sinks, recent=recent, selector=selector,
                                   nbits=hashes[0].nbits, quant=quant, dense_layers=dense)
        self.dense_layers = tuple(dense)
        layers = [RetrievalLayer(self, i, hashes[i], top_k, sinks, recent, selector, quant, dense=i in dense)
                  for i in range(L)]
        super().__init__(layers=layers)

    def _retrieval_attention_active(self) -> bool:
        return getattr(self._config, "_attn_implementation", None) == ATTN_NAME

    @property
    def attended_fraction(self) -> Optional[float]:
        """Tokens attended / tokens visible, over all decoded queries of all layers (dense layers count their whole
        context; None before any decode step)."""
        ctx = sum(l.context_tokens for l in self.layers)
        return sum(l.selected_tokens for l in self.layers) / ctx if ctx else None

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for l in self.layers)

    def __repr__(self):
        return f"RetrievalCache({self.config_summary}, layers={len(self.layers)})"


# ---- attention implementation ---------------------------------------------------------------------------------------------
def retrieval_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Optional[Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                **kwargs) -> tuple[Tensor, None]:
    """The ``"kvengine_retrieval"`` attention: top-k sparse decode for ``RetrievalCache`` layers, SDPA otherwise."""
    if _capture is not None:
        _capture[getattr(module, "layer_idx", len(_capture))] = (query.detach()[0].clone(), key.detach()[0].clone())
    tag = getattr(key, _TAG, None)
    if tag is not None:
        try:
            delattr(key, _TAG)
        except AttributeError:
            pass
    if tag is None or tag[1] == "prefill":
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     is_causal=is_causal, **kwargs)
        if tag is not None:
            tag[0].commit_prefill(real_tokens(attention_mask, key.shape[0], key.shape[-2]))
        return out
    layer = tag[0]
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("kvengine_retrieval attention: logit soft-capping is not supported")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("kvengine_retrieval attention: a sliding-window layer reached the retrieval cache")
    if dropout:
        raise NotImplementedError("kvengine_retrieval attention: dropout is not supported in the decode path")
    T = query.shape[-2]
    rows = (layer.qc if layer.qc is not None else layer.ra).row_lens  # after this chunk's append
    check_cached_padding(attention_mask, key.shape[0], layer.cumulative_length, 0, rows,
                         "kvengine_retrieval attention")
    out = layer.attend_pending(query, scaling)  # [B, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"kvengine_retrieval"`` in transformers' AttentionInterface / AttentionMaskInterface (idempotent)."""
    AttentionInterface.register(ATTN_NAME, retrieval_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


register()


# ---- trained hashes for every layer ----------------------------------------------------------------------------------------
@torch.no_grad()
def capture_qk_all(model, ids: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """Post-RoPE queries [Hq, T, D] and keys [Hkv, T, D] of every attention layer on ``ids`` [T] or [1, T] (one
    forward with the ``"kvengine_retrieval"`` attention, no cache)."""
    global _capture
    ids = ids.view(1, -1).to(model.device)
    prev = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation(ATTN_NAME)
    _capture = {}
    try:
        model(ids, use_cache=False)
        out = _capture
    finally:
        _capture = None
        if prev and prev != ATTN_NAME:
            model.set_attn_implementation(prev)
    return out


def train_layer_hashes(model, ids: Tensor, nbits: int = 128, steps: int = 300, layers=None, verbose: bool = False,
                       sinks: int = 4, recent: int = 32, top: Optional[int] = None, n_queries: int = 768,
                       val_ids: Optional[Tensor] = None, val_frac: float = 0.25, return_info: bool = False,
                       **train_kw):
    """Trained MLP hashes (``kvengine.retrieval.train_hash``) for every layer, from q/k captured on ``ids`` (use
    text held out from the evaluation).  One forward pass captures every layer (two with the validation text).

    Each layer trains on ``n_queries`` positions of ``ids`` (each query against the keys it causally sees, the
    ``sinks`` first / ``recent`` last tokens — always attended by ``RetrievalCache`` — excluded from the objective)
    and keeps the step (0 = the layer's LSH, ``lsh_hashes(seed=0)``'s hyperplanes) whose sign codes capture the most
    free attention mass in their top ``top`` free slots (default 64 − sinks − recent, at least 16) on the
    validation text: ``val_ids``, or else the last ``val_frac`` of ``ids`` run as a separate sequence.
    ``return_info=True`` returns ``(hashes, {layer: info})`` (best step, validation recall of LSH / trained, time)."""
    from ..retrieval import layer_problem, sample_positions

    ids = ids.view(-1)
    if val_ids is None and val_frac > 0 and ids.numel() >= 256:
        n_va = int(ids.numel() * val_frac)
        ids, val_ids = ids[: ids.numel() - n_va], ids[ids.numel() - n_va:]
    caps = capture_qk_all(model, ids)
    caps_va = capture_qk_all(model, val_ids.view(-1)) if val_ids is not None else None
    if top is None:
        top = max(16, 64 - sinks - recent)
    out, infos = {}, {}
    for li in sorted(caps) if layers is None else layers:
        t0 = time.perf_counter()
        q, k = caps[li]
        T = q.shape[1]
        min_pos = min(sinks + recent + top, T - 1)
        qg, kf, s, pos = layer_problem(q, k, sample_positions(T, n_queries, min_pos, seed=li))
        val = None
        if caps_va is not None:
            qv, kv = caps_va[li]
            Tv = qv.shape[1]
            val = layer_problem(qv, kv, sample_positions(Tv, n_queries // 2, min(min_pos, Tv - 1), seed=li + 1))
        with torch.enable_grad():
            out[li], info = train_hash(qg, kf, s, nbits=nbits, steps=steps, seed=li, q_pos=pos, sinks=sinks,
                                       recent=recent, top=top, val=val, return_info=True, **train_kw)
        info["time_s"] = time.perf_counter() - t0
        infos[li] = info
        if verbose:
            print(f"trained hash of layer {li} in {info['time_s']:.1f}s: best step {info['best_step']}, validation "
                  f"free-mass recall LSH {info['lsh_val_recall']:.4f} -> {info['val_recall']:.4f}", flush=True)
    return (out, infos) if return_info else out


# ---- perplexity evaluation --------------------------------------------------------------------------------------------------
def retrieval_eval_rows(top_ks=(64, 128, 256), lsh=True, oracle=True, trained: bool = False, sinks: int = 4,
                        recent: int = 32, nbits: int = 128, kv_bits=(), kv_group: int = 32,
                        kv_residual: int = 128, dense_layers=(), oracle_logit: bool = False) -> list[dict]:
    """The rows ``kvengine retrieval-eval`` runs: full attention, then per top_k LSH / trained hash / oracle; with
    ``kv_bits`` each hash row again over a packed K/V cache of those bits (``RetrievalCache(quant=...)``: group
    ``kv_group``, ``kv_residual`` recent tokens in full precision, ``sinks`` sinks, default rotation/clip);
    ``dense_layers``: layers that attend their whole context in every top-k row (``RetrievalCache(dense_layers=)``);
    ``oracle_logit``: also the ``selector="oracle_logit"`` rows."""
    rows = [{"config": "full attention", "kind": "full"}]
    for k in top_ks:
        for name, kind, on in (("LSH", "lsh", lsh), ("trained MLP", "trained", trained)):
            if not on:
                continue
            rows.append({"config": f"{name} {nbits}b", "kind": "hash", "hashes": kind, "top_k": k})
            for b in kv_bits:
                rows.append({"config": f"{name} {nbits}b + INT{b} KV G{kv_group}", "kind": "hash", "hashes": kind,
                             "top_k": k, "quant": dict(bits_k=b, bits_v=b, group_size=kv_group,
                                                       residual=kv_residual, sinks=sinks)})
        if oracle:
            rows.append({"config": "oracle top-k", "kind": "oracle", "selector": "oracle", "top_k": k})
        if oracle_logit:
            rows.append({"config": "oracle (logits)", "kind": "oracle", "selector": "oracle_logit", "top_k": k})
    for r in rows:
        r.update(sinks=sinks, recent=recent, nbits=nbits)
        if r["kind"] != "full":
            r["dense_layers"] = sorted(int(i) for i in dense_layers)
    return rows


def paired_notes(results: list[dict]) -> list[str]:
    """Per top_k, each hash row (and the logit oracle's) against the mass oracle's row of that k: the PPL ratio and
    its paired standard error (log space), e.g. whether "trained beats oracle" is more than noise.  ``results`` from
    ``run_retrieval_eval``."""
    from ..cli import paired_ratio

    notes = []
    for r in results:
        if r["kind"] == "full" or r.get("quant") or r.get("selector") == "oracle":
            continue
        o = next((x for x in results if x.get("selector") == "oracle" and x["top_k"] == r["top_k"]), None)
        if o is not None:
            ratio, se = paired_ratio(r["_token_nll"], o["_token_nll"])
            notes.append(f"{r['config']} / oracle at k={r['top_k']}: PPL ratio {ratio:.4f} ± {se:.4f} (paired se)")
    return notes


def run_retrieval_eval(lm, windows: Tensor, rows: list[dict], prefill: int = 512, chunk: int = 32,
                       trained_hashes=None, seed: int = 0, progress: bool = True,
                       full_attn: str = "eager") -> list[dict]:
    """Teacher-forced PPL (``kvengine.cli.teacher_forced_nll``) of each row over ``windows`` [N, L]: prefill with full
    attention, then decode through a ``RetrievalCache``.  The "full" row uses a ``DynamicCache`` and transformers'
    ``full_attn`` implementation.  Fills ppl, ppl_ratio (to the full-attention row) and ppl_ratio_se (its standard
    error in log space from the paired per-token NLL differences, ``kvengine.cli.paired_ratio``), attended_fraction
    (decoded queries of all layers: tokens attended / tokens visible) and time_s; ``_token_nll`` holds each row's
    per-token NLL for further paired comparisons (``paired_ratio``)."""
    from transformers import DynamicCache

    from ..cli import paired_ratio, teacher_forced_nll

    model = lm.model if hasattr(lm, "model") else lm
    model.set_attn_implementation(ATTN_NAME)
    with torch.inference_mode():  # warm-up (first-call kernel setup), so that the first row's time is comparable
        model(windows[:1, : min(prefill, 64)].to(model.device), **cache_kwargs(model, DynamicCache()), use_cache=True)
    out, full_ppl, full_tok = [], None, None
    for row in rows:
        r = dict(row)
        caches = []
        if row["kind"] == "full":
            def make():
                return DynamicCache()
        else:
            if row["kind"] == "hash" and row.get("hashes") == "trained":
                if trained_hashes is None:
                    raise ValueError("run_retrieval_eval: a 'trained' row needs trained_hashes")
                hs = trained_hashes
            else:
                hs = None
            sel = row.get("selector", "oracle") if row["kind"] == "oracle" else "hash"

            def make(row=row, hs=hs, sel=sel):
                c = RetrievalCache(model.config, top_k=row["top_k"], sinks=row["sinks"], recent=row["recent"],
                                   hashes=hs, nbits=row.get("nbits", 128), seed=seed, selector=sel,
                                   quant=row.get("quant"), dense_layers=row.get("dense_layers", ()))
                caches.append(c)
                return c
        # the full-attention reference runs transformers' own eager attention (torch's CPU SDPA with a mask is
        # several times slower for short decode chunks; the two agree to fp32 rounding)
        model.set_attn_implementation(full_attn if row["kind"] == "full" else ATTN_NAME)
        try:
            res = teacher_forced_nll(model, windows, make, prefill, chunk, progress=progress,
                                     desc=f"{row['config']} k={row.get('top_k', '-')}", token_nll=True)
        finally:
            model.set_attn_implementation(ATTN_NAME)
        r.update(ppl=res["ppl"], nll=res["nll"], tokens=res["tokens"], time_s=res["time_s"],
                 _token_nll=res["token_nll"])
        if row["kind"] == "full":
            full_ppl, full_tok = res["ppl"], res["token_nll"]
            r["attended_fraction"] = 1.0
        else:
            sel_n = sum(l.selected_tokens for c in caches for l in c.layers)
            ctx_n = sum(l.context_tokens for c in caches for l in c.layers)
            r["attended_fraction"] = sel_n / ctx_n if ctx_n else None
        out.append(r)
    for r in out:
        r["ppl_ratio"] = r["ppl"] / full_ppl if full_ppl else None
        r["ppl_ratio_se"] = paired_ratio(r["_token_nll"], full_tok)[1] if full_ppl else None
    return out


__all__ = ["RetrievalCache", "RetrievalLayer", "retrieval_attention_forward", "register", "ATTN_NAME", "save_hashes",
           "load_hashes", "lsh_hashes", "capture_qk_all", "train_layer_hashes", "retrieval_eval_rows",
           "run_retrieval_eval"]
