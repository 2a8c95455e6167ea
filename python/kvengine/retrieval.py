"""Hash-based top-k KV retrieval (Spotlight Attention style).

* ``SpotlightHash``: per-KV-head hash functions for keys and queries (``f = u + silu(u) @ w2 + b2``, ``u = x @ w1 + b1``;
  with ``w2 = None`` — or zero — a linear random-hyperplane LSH).  Queries of the g heads of a GQA group use their KV
  head's query hash.
* ``HashCodeCache``: packed key codes, appended with one ``hash_encode`` call per step (old keys never re-hashed).
* ``RetrievalAttention``: codes + full-precision K/V; ``attend(q)`` = encode q → ``hamming_topk`` →
  ``sparse_decode_attention``.
* ``train_hash``: trains the query/key MLPs with a Bradley–Terry ranking loss against true attention scores, the sign
  relaxed to ``tanh(f / τ)``; ``topk_recall`` measures the attention mass a hash's top-k captures;
  ``model_recall_report`` runs the comparison on q/k captured from SmolLM2 (``kvengine.models``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["SpotlightHash", "HashCodeCache", "RetrievalAttention", "train_hash", "topk_recall",
           "capture_qk", "model_recall_report"]


def _dev(t: Optional[Tensor], device) -> Optional[Tensor]:
    return None if t is None else t.to(device)


@dataclass
class _Weights:
    w1: Tensor                   # [H, D, nbits]
    b1: Optional[Tensor] = None  # [H, nbits]
    w2: Optional[Tensor] = None  # [H, nbits, nbits]
    b2: Optional[Tensor] = None  # [H, nbits]

    def tuple(self):
        return self.w1, self.b1, self.w2, self.b2

    def to(self, device):
        return _Weights(*(_dev(t, device) for t in self.tuple()))


class SpotlightHash:
    """Hash functions of one attention layer: key weights and (optionally different) query weights, per KV head."""

    def __init__(self, k_weights: _Weights, q_weights: Optional[_Weights] = None):
        self.k = k_weights
        self.q = q_weights if q_weights is not None else k_weights
        self.num_heads, self.head_dim, self.nbits = self.k.w1.shape

    # -- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def random(cls, num_kv_heads: int, head_dim: int, nbits: int = 128, mlp: bool = False,
               generator: Optional[torch.Generator] = None) -> "SpotlightHash":
        """Random-hyperplane LSH (shared by queries and keys); ``mlp=True`` adds a zero residual layer (same codes)."""
        w1 = torch.randn(num_kv_heads, head_dim, nbits, generator=generator) / math.sqrt(head_dim)
        if not mlp:
            return cls(_Weights(w1))
        z = torch.zeros(num_kv_heads, nbits)
        return cls(_Weights(w1, z, torch.zeros(num_kv_heads, nbits, nbits), z.clone()))

    def to(self, device) -> "SpotlightHash":
        shared = self.q is self.k
        k = self.k.to(device)
        return SpotlightHash(k, None if shared else self.q.to(device))

    # -- encoding --------------------------------------------------------------------------------------------------------
    def weights(self, which: str = "k"):
        return (self.k if which == "k" else self.q).tuple()

    def encode_keys(self, k: Tensor) -> Tensor:
        """k [B, Hkv, T, D] -> codes int32 [B, Hkv, T, nbits/32]."""
        return ops.hash_encode(k, *self.k.tuple())

    def encode_queries(self, q: Tensor) -> Tensor:
        """q [B, Hq, Tq, D] -> codes int32 [B, Hq, Tq, nbits/32] (query head hq hashed by KV head hq // g)."""
        B, Hq, Tq, D = q.shape
        g = Hq // self.num_heads
        x = q.reshape(B, self.num_heads, g * Tq, D)
        return ops.hash_encode(x, *self.q.tuple()).reshape(B, Hq, Tq, self.nbits // 32)

    # -- persistence -------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        d = {f"k_{n}": t for n, t in zip(("w1", "b1", "w2", "b2"), self.k.tuple()) if t is not None}
        if self.q is not self.k:
            d.update({f"q_{n}": t for n, t in zip(("w1", "b1", "w2", "b2"), self.q.tuple()) if t is not None})
        return {kk: v.detach().cpu() for kk, v in d.items()}

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def from_state_dict(cls, d: dict) -> "SpotlightHash":
        def w(p):
            if f"{p}_w1" not in d:
                return None
            return _Weights(*(d.get(f"{p}_{n}") for n in ("w1", "b1", "w2", "b2")))

        return cls(w("k"), w("q"))

    @classmethod
    def load(cls, path) -> "SpotlightHash":
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class HashCodeCache:
    """Packed key codes [B, Hkv, capacity, W]; ``append`` hashes only the new keys (one hash_encode call)."""

    def __init__(self, hasher: SpotlightHash, batch_size: int = 1, device="cpu", capacity: int = 1024):
        self.hasher = hasher
        self.W = hasher.nbits // 32
        self._buf = torch.empty(batch_size, hasher.num_heads, max(1, capacity), self.W, dtype=torch.int32,
                                device=device)
        self.seq_len = 0

    def _reserve(self, n: int) -> None:
        cap = self._buf.shape[2]
        if n <= cap:
            return
        new = torch.empty(*self._buf.shape[:2], max(n, 2 * cap), self.W, dtype=torch.int32, device=self._buf.device)
        new[:, :, : self.seq_len] = self._buf[:, :, : self.seq_len]
        self._buf = new

    def append(self, k: Tensor) -> Tensor:
        """k [B, Hkv, T, D] (post-RoPE keys) -> their codes, stored after the existing ones."""
        c = self.hasher.encode_keys(k)
        T = c.shape[2]
        self._reserve(self.seq_len + T)
        self._buf[:, :, self.seq_len : self.seq_len + T] = c
        self.seq_len += T
        return c

    @property
    def codes(self) -> Tensor:
        """A view [B, Hkv, seq_len, W] (no copy)."""
        return self._buf[:, :, : self.seq_len]

    @property
    def nbytes(self) -> int:
        return self._buf[:, :, : self.seq_len].numel() * 4


class RetrievalAttention:
    """Decode attention over the top-k keys of a hash-code index: full-precision K/V + ``HashCodeCache``.

    ``attend(q)``: encode q (one call), ``hamming_topk`` (sinks and the recent window always kept, counting toward
    ``top_k``), exact softmax over the selected tokens (``sparse_decode_attention``).
    """

    def __init__(self, hasher: SpotlightHash, num_kv_heads: int, head_dim: int, top_k: int = 1024, sinks: int = 4,
                 recent: int = 64, batch_size: int = 1, dtype=torch.float32, device="cpu", capacity: int = 1024):
        self.hasher = hasher
        self.top_k, self.sinks, self.recent = top_k, sinks, recent
        self.codes = HashCodeCache(hasher, batch_size, device, capacity)
        self._k = torch.empty(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self.seq_len = 0

    def append(self, k: Tensor, v: Tensor) -> None:
        T = k.shape[2]
        n = self.seq_len + T
        if n > self._k.shape[2]:
            cap = max(n, 2 * self._k.shape[2])
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = old.new_empty(*old.shape[:2], cap, old.shape[3])
                new[:, :, : self.seq_len] = old[:, :, : self.seq_len]
                setattr(self, name, new)
        self._k[:, :, self.seq_len : n] = k
        self._v[:, :, self.seq_len : n] = v
        self.codes.append(k)
        self.seq_len = n

    @property
    def k(self) -> Tensor:
        return self._k[:, :, : self.seq_len]

    @property
    def v(self) -> Tensor:
        return self._v[:, :, : self.seq_len]

    def select(self, q: Tensor) -> tuple[Tensor, Tensor]:
        kk = min(self.top_k, self.seq_len)
        sinks = min(self.sinks, kk)
        recent = min(self.recent, kk - sinks)
        return ops.hamming_topk(self.hasher.encode_queries(q), self.codes.codes, kk, keep=(sinks, recent))

    def attend(self, q: Tensor, softmax_scale: Optional[float] = None) -> Tensor:
        """q [B, Hq, 1, D] -> [B, Hq, 1, D]."""
        idx, _ = self.select(q)
        return ops.sparse_decode_attention(q, self.k, self.v, idx, None, softmax_scale)


# ---- training ---------------------------------------------------------------------------------------------------------
def _project(x: Tensor, w1, b1, w2, b2) -> Tensor:
    u = x @ w1 + b1.unsqueeze(-2)
    return u + F.silu(u) @ w2 + b2.unsqueeze(-2)


def train_hash(q_samples: Tensor, k_samples: Tensor, attn_scores: Tensor, nbits: int = 128, steps: int = 300,
               lr: float = 1e-2, tau: float = 1.0, top: int = 32, negatives: int = 64, queries_per_step: int = 64,
               shared: bool = False, seed: int = 0, verbose: bool = False) -> SpotlightHash:
    """Train per-KV-head query/key MLP hashes with a Bradley–Terry ranking loss.

    q_samples [H, Nq, D] (the post-RoPE queries of each KV head's group), k_samples [H, Nk, D], attn_scores
    [H, Nq, Nk] (true logits, e.g. q·k/√D; -inf marks keys a query cannot see — they enter no pair).  Relaxed similarity ``s = Σ_j tanh(fq_j/τ)·tanh(fk_j/τ) / √nbits``
    (= (nbits − 2·hamming)/√nbits at the sign limit).  Per step and query: ``top`` keys sampled among the true best
    ``4·top`` and ``negatives`` random keys; loss = mean over pairs (i, j) with ``a_i > a_j`` of
    ``softplus(−(s_i − s_j))``.  Initialised at the LSH (w1 Gaussian, w2 = 0) and trained with Adam.
    """
    g = torch.Generator().manual_seed(seed)
    H, Nq, D = q_samples.shape
    Nk = k_samples.shape[1]
    qs, ks, a = q_samples.float(), k_samples.float(), attn_scores.float()
    sx = torch.cat([qs, ks], 1).std(dim=(1, 2)).clamp_min(1e-6)  # [H]

    def init():
        w1 = torch.randn(H, D, nbits, generator=g) / (math.sqrt(D) * sx[:, None, None])
        return [w1, torch.zeros(H, nbits), torch.zeros(H, nbits, nbits), torch.zeros(H, nbits)]

    pk = [t.requires_grad_() for t in init()]
    pq = pk if shared else [t.requires_grad_() for t in init()]
    for t_q, t_k in zip(pq, pk):  # start from the same LSH hyperplanes
        if t_q is not t_k:
            t_q.data.copy_(t_k.data)
    params = pk if shared else pk + pq
    opt = torch.optim.Adam(params, lr=lr)
    ntop = min(4 * top, Nk)
    best = a.topk(ntop, dim=-1).indices  # [H, Nq, ntop]
    hh = torch.arange(H)[:, None, None]
    for step in range(steps):
        qi = torch.randint(0, Nq, (queries_per_step,), generator=g)
        pos = best[:, qi].gather(-1, torch.randint(0, ntop, (H, queries_per_step, min(top, ntop)), generator=g))
        neg = torch.randint(0, Nk, (H, queries_per_step, negatives), generator=g)
        sel = torch.cat([pos, neg], -1)  # [H, Qs, P]
        fq = torch.tanh(_project(qs[:, qi], *pq) / tau)  # [H, Qs, nbits]
        fk = torch.tanh(_project(ks[hh, sel].reshape(H, -1, D), *pk) / tau).reshape(*sel.shape, nbits)
        s = (fk * fq.unsqueeze(2)).sum(-1) / math.sqrt(nbits)  # [H, Qs, P]
        at = a[hh, qi[None, :, None], sel]
        diff = s.unsqueeze(-1) - s.unsqueeze(-2)  # s_i - s_j
        fin = torch.isfinite(at)  # masked (-inf) keys never enter a pair
        label = ((at.unsqueeze(-1) > at.unsqueeze(-2)) & fin.unsqueeze(-1) & fin.unsqueeze(-2)).float()
        loss = (F.softplus(-diff) * label).sum() / label.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"train_hash step {step}: loss {loss.item():.4f}")
    kw = _Weights(*(t.detach().clone() for t in pk))
    qw = None if shared else _Weights(*(t.detach().clone() for t in pq))
    return SpotlightHash(kw, qw)


@torch.no_grad()
def topk_recall(hasher: SpotlightHash, q: Tensor, k: Tensor, attn_scores: Tensor, top_k: int) -> float:
    """Mean attention mass (softmax of attn_scores over the keys) that the hash's top_k keys capture.

    q [H, Nq, D], k [H, Nk, D], attn_scores [H, Nq, Nk] (per KV head; every query scored on its own)."""
    H, Nq, D = q.shape
    kc = hasher.encode_keys(k.unsqueeze(0))  # [1, H, Nk, W]
    qc = hasher.encode_queries(q.unsqueeze(0))[0]  # [H, Nq, W] (one query head per KV head)
    # one "batch" per query: q codes [Nq, H, W], k codes expanded (no copy)
    qc = qc.transpose(0, 1).contiguous()
    idx, _ = ops.hamming_topk(qc, kc.expand(Nq, -1, -1, -1), top_k)  # [Nq, H, top_k]
    p = torch.softmax(attn_scores.float(), -1)  # [H, Nq, Nk]
    return p.transpose(0, 1).gather(-1, idx.long()).sum(-1).mean().item()


# ---- real-model q/k capture (SmolLM2 via kvengine.models) ------------------------------------------------------------
@torch.no_grad()
def capture_qk(layers=(4, 12, 20), n_tokens: int = 2048, model=None):
    """Post-RoPE q [Hkv, g·n, D] and k [Hkv, n, D] of the given layers of SmolLM2 on the offline text, via forward
    pre-hooks on the attention's q/k projections (RoPE applied here with the model's rotary embedding)."""
    from . import models

    lm = model or models.load_model(verbose=False)
    m, tok = lm.model, lm.tokenizer
    cfg = m.config
    ids = models.token_ids(tok, n_tokens)
    if ids.dim() == 1:
        ids = ids[None]
    ids = ids[:, :n_tokens]
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    caps = {}
    hooks = []
    for li in layers:
        attn = m.model.layers[li].self_attn

        def hook(mod, args, kwargs, li=li):
            hs = args[0] if args else kwargs["hidden_states"]
            caps[li] = (mod.q_proj(hs), mod.k_proj(hs))

        hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        m(ids)
    finally:
        for h in hooks:
            h.remove()
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    cos, sin = m.model.rotary_emb(torch.zeros(1, T, D), pos)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out = {}
    for li, (qp, kp) in caps.items():
        q = qp.view(1, T, Hq, D).transpose(1, 2)
        k = kp.view(1, T, Hkv, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out[li] = (q[0], k[0])  # [Hq, T, D], [Hkv, T, D]
    return out


def model_recall_report(layers=(4, 12, 20), n_tokens: int = 2048, bits=(32, 64, 128), top_k: int = 64,
                        steps: int = 300, n_eval_queries: int = 128, verbose: bool = True) -> list[dict]:
    """Attention-mass recall of the top_k keys chosen by LSH vs a trained MLP hash, per layer and code length, on
    q/k captured from SmolLM2.  Queries are the last ``n_eval_queries`` positions (held out from training), each
    attending causally over all earlier keys restricted to the first ``n_tokens − n_eval_queries`` (one shared key
    set)."""
    caps = capture_qk(layers, n_tokens)
    rows = []
    for li, (q, k) in caps.items():
        Hq, T, D = q.shape
        Hkv = k.shape[0]
        g = Hq // Hkv
        n_keys = T - n_eval_queries
        kk = k[:, :n_keys]
        # queries of each group: [Hkv, g·T', D]
        qg = q.reshape(Hkv, g, T, D)
        q_tr = qg[:, :, : n_keys].reshape(Hkv, g * n_keys, D)
        q_ev = qg[:, :, n_keys:].reshape(Hkv, g * n_eval_queries, D)
        s_tr = q_tr @ kk.transpose(-1, -2) / math.sqrt(D)
        # causal training scores: query at position t sees keys <= t
        t_idx = torch.arange(n_keys).repeat(g)
        s_tr = s_tr.masked_fill(torch.arange(n_keys)[None, None, :] > t_idx[None, :, None], float("-inf"))
        s_ev = q_ev @ kk.transpose(-1, -2) / math.sqrt(D)
        oracle = torch.softmax(s_ev, -1).topk(top_k, -1).values.sum(-1).mean().item()
        for nb in bits:
            lsh = SpotlightHash.random(Hkv, D, nb, generator=torch.Generator().manual_seed(nb))
            trained = train_hash(q_tr, kk, s_tr, nbits=nb, steps=steps)
            r = {"layer": li, "bits": nb, "top_k": top_k, "keys": n_keys, "oracle_mass": oracle,
                 "lsh_mass": topk_recall(lsh, q_ev, kk, s_ev, top_k),
                 "mlp_mass": topk_recall(trained, q_ev, kk, s_ev, top_k)}
            rows.append(r)
            if verbose:
                print(r, flush=True)
    return rows
