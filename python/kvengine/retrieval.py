"""Hash-based top-k KV retrieval (Spotlight Attention style).

* ``SpotlightHash``: per-KV-head hash functions for keys and queries (``f = u + silu(u) @ w2 + b2``, ``u = x @ w1 + b1``;
  with ``w2 = None`` — or zero — a linear random-hyperplane LSH).  Queries of the g heads of a GQA group use their KV
  head's query hash.
* ``HashCodeCache``: packed key codes, appended with one ``hash_encode`` call per step (old keys never re-hashed).
* ``RetrievalAttention``: codes + full-precision K/V; ``attend(q)`` = encode q → ``hamming_topk`` →
  ``sparse_decode_attention``.
* ``train_hash``: trains the query/key MLPs with a listwise cross-entropy (default) or Spotlight's pairwise
  Bradley–Terry loss against the true attention weights, the sign relaxed to ``tanh(f / τ)``; ``topk_recall``
  measures the attention mass a hash's top-k captures; ``model_recall_report`` runs the comparison on q/k captured
  from SmolLM2 (``kvengine.models``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .cache import left_padding, row_index

__all__ = ["SpotlightHash", "HashCodeCache", "RetrievalAttention", "train_hash", "LOSSES", "topk_recall",
           "layer_problem", "sample_positions", "capture_qk", "model_recall_report"]


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


class _Rows:
    """Token buffers [B, H, capacity, *] of one batch, filled in time order.  Rows are left-aligned: after a
    left-padded prompt (``append(valid=...)``) row b holds ``seq_len - short[b]`` tokens (its real ones) and later
    tokens go after its own last one; ``seq_len`` is the longest row's length."""

    def __init__(self, bufs: dict):
        self.bufs = bufs
        self.seq_len = 0
        self.short: Optional[list] = None

    @property
    def row_lens(self) -> list:
        B = next(iter(self.bufs.values())).shape[0]
        return [self.seq_len] * B if self.short is None else [self.seq_len - d for d in self.short]

    def _reserve(self, n: int) -> None:
        for name, old in self.bufs.items():
            cap = old.shape[2]
            if n > cap:
                new = old.new_empty(*old.shape[:2], max(n, 2 * cap), *old.shape[3:])
                new[:, :, : self.seq_len] = old[:, :, : self.seq_len]
                self.bufs[name] = new

    def append(self, xs: dict, valid: Optional[Tensor] = None) -> None:
        """xs: name -> [B, H, T, *] new tokens; ``valid`` [B, T] (first append only): left padding, dropped."""
        x0 = next(iter(xs.values()))
        B, T = x0.shape[0], x0.shape[2]
        if valid is not None:
            valid = left_padding(valid, B, T, x0.device, "RetrievalCache")
        if valid is not None:
            if self.seq_len:
                raise ValueError("RetrievalCache: padding is only accepted in the prompt (the first append)")
            L = [int(x) for x in valid.sum(1).tolist()]
            n = max(L)
            self._reserve(n)
            for name, x in xs.items():
                for b, l in enumerate(L):
                    self.bufs[name][b, :, :l] = x[b, :, T - l :]
            self.seq_len, self.short = n, [n - l for l in L]
            return
        n = self.seq_len + T
        self._reserve(n)
        if self.short is None:
            for name, x in xs.items():
                self.bufs[name][:, :, self.seq_len : n] = x
        else:  # each row's tokens after its own last one
            pos = torch.tensor([[self.seq_len - d + t for t in range(T)] for d in self.short], device=x0.device)
            bi = torch.arange(B, device=x0.device)[:, None]
            for name, x in xs.items():
                self.bufs[name][bi, :, pos] = x.transpose(1, 2)
        self.seq_len = n

    def select_rows(self, index, who: str) -> Tensor:
        B = next(iter(self.bufs.values())).shape[0]
        idx = row_index(index, B, next(iter(self.bufs.values())).device, who)
        self.bufs = {name: t.index_select(0, idx) for name, t in self.bufs.items()}
        if self.short is not None:
            short = [self.short[i] for i in idx.tolist()]
            m = min(short)
            self.seq_len -= m
            self.short = [d - m for d in short] if max(short) > m else None
        return idx

    def truncate(self, n: int, who: str) -> None:
        if not 0 <= n <= min(self.row_lens):
            raise ValueError(f"{who}.truncate: n must be in [0, {min(self.row_lens)}], got {n}")
        self.seq_len -= n

    def view(self, name: str) -> Tensor:
        return self.bufs[name][:, :, : self.seq_len]


class _RowLengths:
    """``seq_len`` (the longest row) and ``row_lens`` of a class that stores its tokens in ``self._rows``."""

    @property
    def seq_len(self) -> int:
        return self._rows.seq_len

    @property
    def row_lens(self) -> list:
        return self._rows.row_lens


class HashCodeCache(_RowLengths):
    """Packed key codes [B, Hkv, capacity, W]; ``append`` hashes only the new keys (one hash_encode call)."""

    def __init__(self, hasher: SpotlightHash, batch_size: int = 1, device="cpu", capacity: int = 1024):
        self.hasher = hasher
        self.W = hasher.nbits // 32
        self._rows = _Rows({"codes": torch.empty(batch_size, hasher.num_heads, max(1, capacity), self.W,
                                                 dtype=torch.int32, device=device)})

    def append(self, k: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """k [B, Hkv, T, D] (post-RoPE keys) -> their codes, stored after the existing ones (``valid``: a
        left-padded prompt, see ``_Rows.append``)."""
        c = self.hasher.encode_keys(k)
        self._rows.append({"codes": c}, valid)
        return c

    def select_rows(self, index: Tensor) -> None:
        """Row i becomes row ``index[i]`` (beam search, batch selection; index as ``QuantizedKVCache.select_rows``)."""
        self._rows.select_rows(index, "HashCodeCache.select_rows")

    def truncate(self, n: int) -> None:
        """Drop the codes of the ``n`` newest keys of every row."""
        self._rows.truncate(n, "HashCodeCache")

    @property
    def codes(self) -> Tensor:
        """A view [B, Hkv, seq_len, W] (no copy; rows shorter than seq_len end earlier, see ``row_lens``)."""
        return self._rows.view("codes")

    @property
    def nbytes(self) -> int:
        return sum(self.row_lens) * self.codes.shape[1] * self.W * 4


class RetrievalAttention(_RowLengths):
    """Decode attention over the top-k keys of a hash-code index: full-precision K/V + ``HashCodeCache``.

    ``attend(q)``: encode q (one call), ``hamming_topk`` (sinks and the recent window always kept, counting toward
    ``top_k``), exact softmax over the selected tokens (``sparse_decode_attention``).
    """

    def __init__(self, hasher: SpotlightHash, num_kv_heads: int, head_dim: int, top_k: int = 1024, sinks: int = 4,
                 recent: int = 64, batch_size: int = 1, dtype=torch.float32, device="cpu", capacity: int = 1024):
        self.hasher = hasher
        self.top_k, self.sinks, self.recent = top_k, sinks, recent
        self.codes = HashCodeCache(hasher, batch_size, device, capacity)
        k = torch.empty(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self._rows = _Rows({"k": k, "v": torch.empty_like(k)})

    def append(self, k: Tensor, v: Tensor, valid: Optional[Tensor] = None) -> None:
        """k, v [B, Hkv, T, D]; ``valid`` [B, T]: a left-padded prompt (first append), its padding dropped."""
        self._rows.append({"k": k, "v": v}, valid)
        self.codes.append(k, valid)

    def select_rows(self, index: Tensor) -> None:
        """Row i becomes row ``index[i]`` (beam search, batch selection; index as ``QuantizedKVCache.select_rows``)."""
        idx = self._rows.select_rows(index, "RetrievalAttention.select_rows")
        self.codes.select_rows(idx)

    def truncate(self, n: int) -> None:
        """Drop the ``n`` newest tokens (keys, values and their codes; exact, everything is full precision)."""
        self._rows.truncate(n, "RetrievalAttention")
        self.codes.truncate(n)

    @property
    def k(self) -> Tensor:
        return self._rows.view("k")

    @property
    def v(self) -> Tensor:
        return self._rows.view("v")

    def _seq_lens(self, device) -> Optional[Tensor]:
        """Per-row lengths for the ops when the rows differ (a left-padded prompt), else None."""
        if self._rows.short is None:
            return None
        return torch.tensor(self.row_lens, dtype=torch.int32, device=device)

    def select(self, q: Tensor) -> tuple[Tensor, Tensor]:
        kk = min(self.top_k, self.seq_len)
        sinks = min(self.sinks, kk)
        recent = min(self.recent, kk - sinks)
        return ops.hamming_topk(self.hasher.encode_queries(q), self.codes.codes, kk, self._seq_lens(q.device),
                                keep=(sinks, recent))

    def attend(self, q: Tensor, softmax_scale: Optional[float] = None) -> Tensor:
        """q [B, Hq, 1, D] -> [B, Hq, 1, D]."""
        idx, _ = self.select(q)
        return ops.sparse_decode_attention(q, self.k, self.v, idx, self._seq_lens(q.device), softmax_scale)


# ---- training ---------------------------------------------------------------------------------------------------------
def _project(x: Tensor, w1, b1, w2, b2) -> Tensor:
    """x [H, N, D] or [H, g, N, D] (per-head weights [H, ...])."""
    if x.dim() == 4:
        w1, b1, w2, b2 = w1[:, None], b1[:, None], w2[:, None], b2[:, None]
    u = x @ w1 + b1.unsqueeze(-2)
    return u + F.silu(u) @ w2 + b2.unsqueeze(-2)


def _grouped(q: Tensor, scores: Optional[Tensor]):
    """q [H, Nq, D] (one query head per KV head) or [H, g, Nq, D]; scores likewise -> 4-D views."""
    if q.dim() == 3:
        q = q.unsqueeze(1)
        scores = None if scores is None else scores.unsqueeze(1)
    return q, scores


def _free_mask(q_pos: Tensor, nk: int, sinks: int, recent: int) -> Tensor:
    """[Nq, Nk] bool: keys a query at position q_pos can see (j <= q_pos) that the run-time rule does NOT force
    (the first ``sinks`` and the query's last ``recent`` positions are always attended)."""
    j = torch.arange(nk)[None, :]
    end = q_pos[:, None] + 1
    return (j < end) & (j >= sinks) & (j < end - recent)


def _group_probs(scores: Tensor, target: str = "mass") -> Tensor:
    """scores [H, g, Nq, Nk] (-inf = invisible) -> the group's target distribution [H, Nq, Nk]: ``"mass"`` the true
    attention weights averaged over the group's heads; ``"logit"`` the softmax of the logits averaged over the heads
    (the normalised geometric mean of the heads' weights: the ranking of ``selector="oracle_logit"``)."""
    if target == "mass":
        return torch.softmax(scores.float(), -1).nan_to_num_(0.0).mean(1)
    if target == "logit":
        return torch.softmax(scores.float().mean(1), -1).nan_to_num_(0.0)
    raise ValueError(f"train_hash: target must be 'mass' or 'logit', got {target!r}")


LOSSES = ("listwise", "bradley_terry")


def _bradley_terry(S: Tensor, P: Tensor, free: Tensor, top: int, max_losers: Optional[int] = 256) -> Tensor:
    """Pairwise Bradley–Terry loss of relaxed scores S [H, Q, N] against target masses P [H, Q, N] (0 off ``free``,
    [1 or H, Q, N] bool): the ``top`` free keys of most mass win against every other free key; the mean over a
    query's pairs of ``softplus(S_l − S_w)`` (= −log σ(S_w − S_l)), queries weighted by their free mass.  With more
    than ``max_losers`` losers only the ``max_losers`` of highest current score are paired (the others' pairs have the
    smallest terms and gradients); the mean still divides by every pair."""
    m = free.expand_as(S)
    top = min(top, S.shape[-1])
    win = P.masked_fill(~m, -1.0).topk(top, -1).indices  # [H, Q, top]
    win_ok = m.gather(-1, win) & (P.gather(-1, win) > 0)
    lose = m.clone()
    lose.scatter_(-1, win, False)
    n_pairs = win_ok.sum(-1) * lose.sum(-1)  # [H, Q]
    if max_losers is not None and S.shape[-1] - top > max_losers:
        hard = S.detach().masked_fill(~lose, float("-inf")).topk(max_losers, -1).indices  # [H, Q, max_losers]
        S_l, l_ok = S.gather(-1, hard), lose.gather(-1, hard)
    else:
        S_l, l_ok = S, lose
    diff = S_l[..., None, :] - S.gather(-1, win)[..., :, None]  # [H, Q, top, losers]: S_loser − S_winner
    pairs = win_ok[..., :, None] & l_ok[..., None, :]
    per_q = (F.softplus(diff) * pairs).sum((-1, -2)) / n_pairs.clamp_min(1)
    return (P.sum(-1) * per_q).mean()


def train_hash(q_samples: Tensor, k_samples: Tensor, attn_scores: Tensor, nbits: int = 128, steps: int = 300,
               lr: float = 1e-2, tau: float = 1.0, top: int = 32, queries_per_step: int = 64, shared: bool = False,
               seed: int = 0, verbose: bool = False, q_pos: Optional[Tensor] = None, sinks: int = 0,
               recent: int = 0, val_frac: float = 0.25, eval_every: int = 10, return_info: bool = False,
               val: Optional[tuple] = None, target: str = "mass", loss: str = "listwise",
               bt_losers: Optional[int] = 256):
    """Train per-KV-head query/key MLP hashes for top-k selection, starting from (and never returning worse than)
    random-hyperplane LSH on a held-out split.

    q_samples [H, Nq, D] or [H, g, Nq, D] (the g post-RoPE query heads of each KV head at Nq positions),
    k_samples [H, Nk, D], attn_scores [H, (g,) Nq, Nk] (true logits q·k/√D; -inf marks keys a query cannot see).
    ``q_pos`` [Nq] (default: every query sees all Nk keys, position Nk − 1): with ``sinks`` / ``recent`` the keys
    the run-time selection always keeps (``hamming_topk(keep=(sinks, recent))``) are excluded from the objective, so
    the hash only ranks the keys it actually chooses among.

    Objective (listwise, attention-mass weighted): the selection scores a key by the Hamming similarity summed over
    the group's query heads, relaxed to ``S = Σ_heads Σ_bits tanh(fq/τ)·tanh(fk/τ) / √nbits``; loss per query =
    cross-entropy of the group's target distribution P on the free keys against ``softmax(β·S)`` over the free keys
    (β learned per head) — un-normalised P, so queries whose free keys hold little mass weigh little.  ``target``:
    ``"mass"`` P = the true attention weights averaged over the g heads (the ``selector="oracle"`` ranking);
    ``"logit"`` P = softmax of the logits averaged over the g heads (the ``"oracle_logit"`` ranking).
    ``loss="bradley_terry"`` (Spotlight's pairwise form) instead: the ``top`` free keys with the most target mass are
    the winners, every other free key a loser, and each (winner, loser) pair costs ``−log σ(β·(S_w − S_l))`` (the
    Bradley–Terry probability that the winner outranks the loser); per query the mean over its pairs, weighted by
    the query's free mass as above (``bt_losers``: pair each winner with only that many of the highest-scored
    losers, ``None`` = all).  Initialised at LSH (w1 Gaussian / scale, b = 0, w2 = 0: the codes of
    ``SpotlightHash.random(H, D, nbits, generator=torch.Generator().manual_seed(seed))``), Adam.  A ``val_frac``
    split of the queries (the last positions) is held out — or, better (the split shares its keys with training),
    ``val = (q, k, attn_scores, q_pos)`` from another sequence; every ``eval_every`` steps (and at step 0 = LSH)
    the free mass of P the sign codes' top-``top`` free keys capture is measured there and the best weights
    are returned (LSH's when training never beats it).  ``return_info=True`` returns ``(hash, info)`` with the
    validation curve.
    """
    if loss not in LOSSES:
        raise ValueError(f"train_hash: loss must be one of {LOSSES}, got {loss!r}")
    g = torch.Generator().manual_seed(seed)
    qs, a = _grouped(q_samples.float(), attn_scores)
    H, G, Nq, D = qs.shape
    ks = k_samples.float()
    Nk = ks.shape[1]
    if q_pos is None:
        q_pos = torch.full((Nq,), Nk - 1, dtype=torch.long)
    q_pos = q_pos.long().cpu()
    P = _group_probs(a, target)  # [H, Nq, Nk]
    free = _free_mask(q_pos, Nk, sinks, recent)[None]  # [1, Nq, Nk]
    P = P * free
    n_val = 0 if val is not None else (int(round(Nq * val_frac)) if Nq >= 8 else 0)
    tr = torch.arange(Nq - n_val)
    if val is not None:
        vq, vs = _grouped(val[0].float(), val[2])
        vk = val[1].float()
        vpos = (torch.full((vq.shape[2],), vk.shape[1] - 1, dtype=torch.long) if len(val) < 4 or val[3] is None
                else val[3].long().cpu())
        vfree = _free_mask(vpos, vk.shape[1], sinks, recent)[None]
        vP = _group_probs(vs, target) * vfree
        n_val = vq.shape[2]
    else:
        va = torch.arange(Nq - n_val, Nq)
        vq, vk, vfree, vP = qs[:, :, va], ks, free[:, va], P[:, va]
    has_free = free[0, tr].any(-1)
    tr = tr[has_free] if has_free.any() else tr
    sx = torch.cat([qs.reshape(H, -1, D), ks], 1).std(dim=(1, 2)).clamp_min(1e-6)  # [H]

    def init():
        w1 = torch.randn(H, D, nbits, generator=g) / (math.sqrt(D) * sx[:, None, None])
        return [w1, torch.zeros(H, nbits), torch.zeros(H, nbits, nbits), torch.zeros(H, nbits)]

    pk = [t.requires_grad_() for t in init()]
    pq = pk if shared else [t.detach().clone().requires_grad_() for t in pk]  # start from the same hyperplanes
    log_beta = torch.zeros(H, 1, 1, requires_grad=True)
    params = (pk if shared else pk + pq) + [log_beta]
    opt = torch.optim.Adam(params, lr=lr)
    rs = 1.0 / math.sqrt(nbits)
    ntop = max(1, min(top, Nk))

    @torch.no_grad()
    def val_recall() -> float:
        if n_val == 0:
            return float("nan")
        sq = torch.sign(_project(vq, *pq)).sum(1)  # [H, Nv, nbits] (group-summed ±1 codes)
        sk = torch.sign(_project(vk, *pk))
        sim = (sq @ sk.transpose(-1, -2)).masked_fill(~vfree, float("-inf"))  # [H, Nv, Nk]
        idx = sim.topk(min(ntop, vk.shape[1]), -1).indices
        got = vP.gather(-1, idx) * vfree.expand(H, -1, -1).gather(-1, idx)
        return got.sum(-1).mean().item()

    best_r, best_step = val_recall(), 0
    best = [t.detach().clone() for t in params]
    curve = [(0, best_r)]
    for step in range(1, steps + 1):
        qi = tr[torch.randint(0, len(tr), (min(queries_per_step, len(tr)),), generator=g)]
        fq = torch.tanh(_project(qs[:, :, qi], *pq) / tau).sum(1)  # [H, Qs, nbits]
        fk = torch.tanh(_project(ks, *pk) / tau)  # [H, Nk, nbits]
        S = (fq @ fk.transpose(-1, -2)) * (rs * log_beta.exp())  # [H, Qs, Nk]
        m = free[:, qi]
        if loss == "listwise":
            logp = torch.log_softmax(S.masked_fill(~m, float("-inf")), -1).masked_fill(~m, 0.0)
            obj = -(P[:, qi] * logp).sum(-1).mean()
        else:
            obj = _bradley_terry(S, P[:, qi], m, ntop, bt_losers)
        opt.zero_grad()
        obj.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            r = val_recall()
            curve.append((step, r))
            if r > best_r:
                best_r, best_step = r, step
                best = [t.detach().clone() for t in params]
            if verbose:
                print(f"train_hash step {step}: loss {obj.item():.4f} val recall {r:.4f}", flush=True)
    if n_val == 0:  # nothing to select on: the final weights
        best = [t.detach().clone() for t in params]
        best_step = steps
    nk_ = 4
    kw = _Weights(*best[:nk_])
    qw = None if shared else _Weights(*best[nk_:2 * nk_])
    h = SpotlightHash(kw, qw)
    if return_info:
        return h, {"best_step": best_step, "val_recall": best_r, "lsh_val_recall": curve[0][1], "curve": curve}
    return h


@torch.no_grad()
def topk_recall(hasher: SpotlightHash, q: Tensor, k: Tensor, attn_scores: Tensor, top_k: int,
                q_pos: Optional[Tensor] = None, sinks: int = 0, recent: int = 0, free_only: bool = False) -> float:
    """Mean attention mass that the run-time selection captures: per query position and KV head,
    ``hamming_topk`` (Hamming similarity summed over the group's query heads) picks ``top_k`` keys among those the
    query sees, the first ``sinks`` and last ``recent`` always among them; each query head's captured mass =
    Σ softmax(attn_scores) over the picked keys.  ``free_only``: only the mass of picked keys that are not forced
    (sinks / recent) counts — what the hash itself contributes.

    q [H, Nq, D] or [H, g, Nq, D], k [H, Nk, D], attn_scores [H, (g,) Nq, Nk]; q_pos [Nq] (default: all see Nk)."""
    qg, a = _grouped(q, attn_scores)
    H, G, Nq, D = qg.shape
    Nk = k.shape[1]
    lens = (torch.full((Nq,), Nk, dtype=torch.long) if q_pos is None else q_pos.long().cpu() + 1)
    kc = hasher.encode_keys(k.unsqueeze(0))  # [1, H, Nk, W]
    qc = hasher.encode_queries(qg.reshape(1, H * G, Nq, D))[0]  # [H*g, Nq, W]
    qc = qc.transpose(0, 1).contiguous()  # one "batch" per query position
    kk = min(top_k, int(lens.min()))
    s, r = min(sinks, kk), min(recent, kk - min(sinks, kk))
    idx, _ = ops.hamming_topk(qc, kc.expand(Nq, -1, -1, -1), kk, lens.to(torch.int32),
                              keep=(s, r) if (s or r) else None)  # [Nq, H, kk]
    p = torch.softmax(a.float(), -1).nan_to_num(0.0)  # [H, g, Nq, Nk]
    if free_only:
        p = p * _free_mask(q_pos if q_pos is not None else torch.full((Nq,), Nk - 1), Nk, sinks, recent)
    idx = idx.long().clamp_min(0)  # (no -1 padding: kk <= every query's context)
    gi = idx.permute(1, 0, 2)[:, None].expand(H, G, Nq, kk)
    return p.gather(-1, gi).sum(-1).mean().item()


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


def layer_problem(q: Tensor, k: Tensor, positions: Tensor, scale: Optional[float] = None):
    """One layer's queries at ``positions`` as a grouped training / evaluation problem.

    q [Hq, T, D], k [Hkv, T, D] (post-RoPE, one sequence) -> (q [Hkv, g, n, D], k [Hkv, T, D] float, causal scores
    [Hkv, g, n, T] (-inf beyond each position), positions [n]).  Only the n chosen rows of the score matrix are
    computed."""
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    positions = positions.long().cpu()
    qg = q.float().reshape(Hkv, Hq // Hkv, T, D)[:, :, positions]
    kf = k.float()
    s = qg @ kf.transpose(-1, -2)[:, None] * (scale if scale is not None else 1.0 / math.sqrt(D))
    s.masked_fill_(torch.arange(T)[None, :] > positions[:, None], float("-inf"))
    return qg, kf, s, positions


def sample_positions(T: int, n: int, min_pos: int, seed: int = 0) -> Tensor:
    """n distinct positions in [min_pos, T), sorted (all of them when n >= T − min_pos)."""
    avail = torch.arange(min_pos, T)
    if n >= len(avail):
        return avail
    return avail[torch.randperm(len(avail), generator=torch.Generator().manual_seed(seed))[:n]].sort().values


def model_recall_report(layers=(4, 12, 20), n_tokens: int = 2048, bits=(32, 64, 128), top_k: int = 64,
                        steps: int = 300, n_train_queries: int = 768, n_eval_queries: int = 256, sinks: int = 4,
                        recent: int = 32, min_pos: int = 256, model=None, verbose: bool = True,
                        losses=("listwise",), progress=None, text: Optional[str] = None,
                        **train_kw) -> list[dict]:
    """Attention-mass recall of the run-time top-k selection (``hamming_topk`` with the first ``sinks`` and last
    ``recent`` tokens kept, ``top_k`` in all) by LSH vs a trained MLP hash on SmolLM2, on held-out text.

    The hashes are trained (``train_hash`` with the same sinks / recent, initialised at the LSH they are compared
    with) on ``n_train_queries`` positions of ``n_tokens`` tokens read from the END of the text (what
    ``kvengine retrieval-eval --train`` uses), the best step chosen on the next ``n_tokens`` (also from the end);
    recall is measured on ``n_eval_queries`` positions (≥ ``min_pos``) of
    ``n_tokens`` tokens from the START of the text (disjoint), each query over its causal context.  One forward
    pass per text captures every layer (``text``: a plain-text file instead of the Wikipedia summaries).  One row
    per layer, code length and training ``loss`` (``losses``: any of
    ``LOSSES``; the LSH columns are the same in the rows of one layer and code length).  ``progress(n)`` is called
    after each trained hash."""
    import time

    from . import models
    from .integrations.retrieval import capture_qk_all

    lm = model or models.load_model(verbose=False)
    tok = lm.tokenizer
    t0 = time.perf_counter()
    rev = models.token_ids(tok, 2 * n_tokens, text, reverse=True)
    cap_tr = capture_qk_all(lm.model, rev[:n_tokens])
    cap_va = capture_qk_all(lm.model, rev[n_tokens:])
    cap_ev = capture_qk_all(lm.model, models.token_ids(tok, n_tokens, text))
    capture_s = time.perf_counter() - t0
    rows = []
    for li in layers:
        qe, ke, se, pe = layer_problem(*cap_ev[li], sample_positions(n_tokens, n_eval_queries, min_pos, seed=1))
        qt, kt, st, pt = layer_problem(*cap_tr[li], sample_positions(n_tokens, n_train_queries, min_pos, seed=2))
        va = layer_problem(*cap_va[li], sample_positions(n_tokens, n_eval_queries, min_pos, seed=3))
        H, G, _, D = qe.shape
        p = torch.softmax(se, -1)
        oracle_full = p.topk(top_k, -1).values.sum(-1).mean().item()
        free = _free_mask(pe, n_tokens, sinks, recent)
        forced = (p * (~free & (torch.arange(n_tokens)[None, :] <= pe[:, None]))).sum(-1).mean().item()
        # the most mass a shared selection keeps under the run-time rule: forced + the best free tokens by mean weight
        pf = p.mean(1) * free  # [H, n, T]
        best_free = pf.topk(top_k - sinks - recent, -1).indices[:, None].expand(-1, G, -1, -1)
        oracle_keep = forced + (p * free).gather(-1, best_free).sum(-1).mean().item()
        kw = dict(q_pos=pe, sinks=sinks, recent=recent)
        for nb in bits:
            lsh = SpotlightHash.random(H, D, nb, generator=torch.Generator().manual_seed(li))
            lsh_cols = {"lsh_mass": topk_recall(lsh, qe, ke, se, top_k, **kw),
                        "lsh_mass_no_keep": topk_recall(lsh, qe, ke, se, top_k)}
            for loss in losses:
                t1 = time.perf_counter()
                trained, info = train_hash(qt, kt, st, nbits=nb, steps=steps, q_pos=pt, sinks=sinks, recent=recent,
                                           top=top_k - sinks - recent, seed=li, return_info=True, val=va, loss=loss,
                                           **train_kw)
                train_s = time.perf_counter() - t1
                r = {"layer": li, "bits": nb, "loss": loss, "top_k": top_k, "sinks": sinks, "recent": recent,
                     "oracle_top_k_mass": oracle_full, "oracle_mass": oracle_keep, "forced_mass": forced,
                     "lsh_mass": lsh_cols["lsh_mass"],
                     "trained_mass": topk_recall(trained, qe, ke, se, top_k, **kw),
                     "lsh_mass_no_keep": lsh_cols["lsh_mass_no_keep"],
                     "trained_mass_no_keep": topk_recall(trained, qe, ke, se, top_k),
                     "train_s": train_s, "best_step": info["best_step"], "val_lsh": info["lsh_val_recall"],
                     "val_trained": info["val_recall"]}
                rows.append(r)
                if progress is not None:
                    progress(1)
                if verbose:
                    print({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()}, flush=True)
    if rows:
        rows[0]["capture_s"] = capture_s
    return rows
