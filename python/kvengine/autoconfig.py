"""Per-layer automatic configuration: measure each candidate scheme's attention-output error on a layer's real
queries/keys/values and choose, per layer, the scheme with the lowest error such that the model's average effective
bits meets a budget (mixed precision across layers: sensitive layers get more bits).

No single scheme is best for every model (rotating keys helps SmolLM2's per-channel keys, hurts models whose keys
are normalized per head), so the choice is measured, never assumed.  The error of a scheme on a layer is

    ‖softmax(q k̂ᵀ) v̂ − softmax(q kᵀ) v‖ / ‖softmax(q kᵀ) v‖     (causal, GQA, all heads and positions)

with (k̂, v̂) what a ``QuantizedKVCache`` built with that scheme holds after a prefill of the calibration tokens
(the same kernels, the same sinks/recent-window handling as at run time).
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import DEFAULT_ROTATE, QuantizedKVCache  # noqa: F401  (DEFAULT_ROTATE: rotate="auto" without a plan)

ROTATIONS = ("none", "k", "v", "kv")
BIT_PAIRS = ((2, 2), (4, 2), (2, 4), (4, 4))  # (bits_k, bits_v)


@dataclass(frozen=True)
class Scheme:
    bits_k: int = 2
    bits_v: int = 2
    group_size: int = 32
    rotate: str = "kv"  # none | k | v | kv
    reorder: bool = False  # outlier-aware key channel reorder before the rotation
    clip: str = "auto"  # MSE range search: auto (keys; kvengine.cache.DEFAULT_CLIP) | none | k | v | kv
    # keys per-channel (KIVI: groups of group_size tokens) or per-token (groups of min(group_size, D) channels)
    k_mode: str = "per_channel"

    def effective_bits(self, head_dim: int, meta_bits: int = 16) -> float:
        """Bits per element of the packed part (codes + scale/zero), K and V averaged (the recent window and
        sinks add the same amount to every scheme)."""
        vg = min(self.group_size, head_dim)
        k = self.bits_k + 2 * meta_bits / (vg if self.k_mode == "per_token" else self.group_size)
        v = self.bits_v + 2 * meta_bits / vg
        return (k + v) / 2

    def cache_kwargs(self) -> dict:
        kw = dict(bits_k=self.bits_k, bits_v=self.bits_v, group_size=self.group_size,
                  rotate={"none": False, "k": "k", "v": "v", "kv": True}[self.rotate], clip=self.clip)
        if self.k_mode != "per_channel":
            kw["k_mode"] = self.k_mode
        return kw

    @property
    def name(self) -> str:
        b = f"INT{self.bits_k}" if self.bits_k == self.bits_v else f"K{self.bits_k}V{self.bits_v}"
        clip = "" if self.clip == "auto" else f" clip={self.clip}"
        kt = " K/token" if self.k_mode == "per_token" else ""
        return f"{b} G{self.group_size}{kt} rot={self.rotate}{' +reorder' if self.reorder else ''}{clip}"


def default_candidates(bits=BIT_PAIRS, groups=(32, 64, 128), rotations=ROTATIONS,
                       reorder=(False, True), k_modes=("per_channel", "per_token")) -> list[Scheme]:
    """Every (bits_k, bits_v) pair × group size × rotation (none / keys / values / both) × outlier-aware key reorder
    (only with a key rotation, per-channel keys) × key mode (per-channel KIVI groups of G tokens, or per-token
    groups of G channels).  ``bits`` may list ints (K and V the same) or (bits_k, bits_v) pairs."""
    out = []
    for b, g, r, ro, km in itertools.product(bits, groups, rotations, reorder, k_modes):
        bk, bv = (b, b) if isinstance(b, int) else b
        if ro and r not in ("k", "kv"):
            continue  # a reorder only matters before a key rotation
        if ro and km == "per_token":
            continue  # per-token groups mix all channels of a token anyway: the reorder does not change them much
        out.append(Scheme(bk, bv, g, r, ro, k_mode=km))
    return out


def fixed_schemes(budget_bits: float, head_dim: int, window: float = 0.5,
                  candidates: Optional[Sequence[Scheme]] = None) -> list[Scheme]:
    """The uniform (same for every layer) schemes that use the budget: effective bits in (budget − window, budget],
    the fixed configurations an automatic plan at that budget is compared against."""
    cands = candidates or default_candidates()
    return [s for s in cands if budget_bits - window < s.effective_bits(head_dim) <= budget_bits + 1e-9]


def outlier_perm(k: Tensor) -> Tensor:
    """RotateKV-style outlier-aware channel order for keys k [..., T, D]: channels ranked by max |k| dealt out in
    bit-reversed order, so that consecutive outliers fall into Hadamard sub-blocks as far apart as possible."""
    D = k.shape[-1]
    rank = k.detach().abs().reshape(-1, D).amax(0).argsort(descending=True)
    bits = max(1, int(math.log2(D)))
    rev = torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) for i in range(D)])
    perm = torch.empty(D, dtype=torch.long)
    perm[rev] = rank
    return perm


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(g, 1),
                                          v.float().repeat_interleave(g, 1), is_causal=True)


def query_positions(T: int, window: int, max_queries: int = 256) -> Tensor:
    """The query positions a calibration scores: at most ``max_queries``, evenly strided over [window, T) (earlier
    queries read nothing quantized), always including the last position."""
    lo = min(max(window, 0), T - 1)
    n = T - lo
    step = max(1, -(-n // max_queries))
    return torch.arange(T - 1, lo - 1, -step).flip(0)


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, kq: Tensor, vq: Tensor, window: int,
                      pos: Optional[Tensor] = None) -> Tensor:
    """Causal attention as a decode over a quantized cache sees it: query t reads keys/values j with t − j < window
    (its full-precision recent window) exactly and older ones from (kq, vq).  ``pos``: the query positions to
    compute (q holds all T positions); default all."""
    g = q.shape[1] // k.shape[1]
    T = q.shape[2]
    pos = torch.arange(T) if pos is None else pos
    qf = q.float()[:, :, pos]
    kx, vx = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    kqx, vqx = kq.float().repeat_interleave(g, 1), vq.float().repeat_interleave(g, 1)
    t = pos
    dist = t[:, None] - torch.arange(T)[None, :]
    near = (dist >= 0) & (dist < window)
    scale = 1.0 / math.sqrt(q.shape[-1])
    sc = torch.where(near, qf @ kx.transpose(-1, -2), qf @ kqx.transpose(-1, -2)) * scale
    p = torch.softmax(sc.masked_fill(dist < 0, float("-inf")), -1)
    pn = p * near
    return pn @ vx + (p - pn) @ vqx


def attention_error(q: Tensor, k: Tensor, v: Tensor, kq: Tensor, vq: Tensor, ref: Optional[Tensor] = None,
                    window: int = 0, max_queries: Optional[int] = None) -> float:
    """Relative error of causal attention with (kq, vq) instead of (k, v); q [B, Hq, T, D], k/v [B, Hkv, T, D].
    ``window`` > 0: each query reads its last ``window`` tokens exactly (decode emulation, ``_decode_attention``),
    scored on ``query_positions(T, window, max_queries)`` (all positions when ``max_queries`` is None).
    ``ref``: the exact attention output at those positions, if already computed."""
    if window <= 0:
        if ref is None:
            ref = _causal_attention(q, k, v)
        out = _causal_attention(q, kq, vq)
    else:
        T = q.shape[2]
        pos = query_positions(T, window, max_queries or T)
        if ref is None:
            ref = _causal_attention(q, k, v)[:, :, pos]
        out = _decode_attention(q, k, v, kq, vq, window, pos)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


MAX_QUERIES = 256  # query positions scored per layer (strided): the error estimate's cost is linear in it


def scheme_error(q: Tensor, k: Tensor, v: Tensor, s: Scheme, residual: int = 128, sinks: int = 4,
                 ref: Optional[Tensor] = None, perm: Optional[Tensor] = None,
                 max_queries: int = MAX_QUERIES, full_ref: Optional[Tensor] = None):
    """Attention-output error of scheme s on one layer (k, v [B, Hkv, T, D] as the model produced them), as a
    decode sees it: every query position t attends the tokens older than its ``residual``-token recent window in
    their quantized form (sinks exact, the cache's own kernels and group boundaries) and the window exactly.
    With ``full_ref`` (the exact causal attention at all positions) returns (that error, the error when every query
    reads every non-sink token quantized) — the second is a coarser, prefill-like estimate."""
    B, H, T, D = k.shape
    perm = (outlier_perm(k) if perm is None else perm) if s.reorder else None
    # residual=0: every full group quantized, with the group boundaries a decode flush produces (after the sinks)
    c = QuantizedKVCache(H, D, residual=0, sinks=sinks, batch_size=B, dtype=torch.float32, k_perm=perm,
                         **s.cache_kwargs())
    c.append(k.float(), v.float())
    kq, vq = c.dequantize(torch.float32)
    # the cache stores sinks first; calibration tokens have no extra sinks, so the order is the time order
    err = attention_error(q, k, v, kq, vq, ref, window=max(1, residual), max_queries=max_queries)
    if full_ref is None:
        return err
    return err, attention_error(q, k, v, kq, vq, full_ref)


@dataclass
class LayerChoice:
    scheme: Scheme
    error: float
    eff_bits: float
    k_perm: Optional[list] = None


@dataclass
class AutoPlan:
    budget_bits: float
    head_dim: int
    residual: int
    sinks: int
    layers: list  # [LayerChoice]
    table: list  # per layer: {scheme name: (error, bits)} (not saved)
    meta: dict = field(default_factory=dict)  # model, calibration tokens, seconds, ...

    @property
    def effective_bits(self) -> float:
        return sum(c.eff_bits for c in self.layers) / len(self.layers)

    def cache_kwargs(self, layer: int) -> dict:
        c = self.layers[layer]
        kw = c.scheme.cache_kwargs()
        if c.k_perm is not None:
            kw["k_perm"] = torch.tensor(c.k_perm)
        return dict(kw, residual=self.residual, sinks=self.sinks)

    def to_dict(self) -> dict:
        return {"version": 3, "kind": "kvengine-auto-plan", "budget_bits": self.budget_bits,
                "head_dim": self.head_dim, "residual": self.residual, "sinks": self.sinks,
                "effective_bits": self.effective_bits, "meta": self.meta,
                "layers": [dict(asdict(c.scheme), error=c.error, eff_bits=c.eff_bits, k_perm=c.k_perm)
                           for c in self.layers]}

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)
        return path

    @staticmethod
    def from_dict(d: dict) -> "AutoPlan":
        if d.get("version") not in (1, 2, 3):
            raise ValueError(f"kvengine: auto plan version {d.get('version')} is not supported (expected 1, 2 or 3)")
        layers = []
        for L in d["layers"]:
            # version 1 plans predate the range search: their schemes were measured with min/max quantization
            clip = L.get("clip", "auto") if d["version"] >= 2 else "none"
            # version 3 added per-token keys; older plans only had KIVI per-channel keys
            s = Scheme(L["bits_k"], L["bits_v"], L["group_size"], L["rotate"], L["reorder"], clip,
                       L.get("k_mode", "per_channel"))
            layers.append(LayerChoice(s, L["error"], L["eff_bits"], L.get("k_perm")))
        return AutoPlan(d["budget_bits"], d["head_dim"], d["residual"], d["sinks"], layers, [], dict(d.get("meta") or {}))

    @staticmethod
    def load(path: str) -> "AutoPlan":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"kvengine: auto plan '{path}' does not exist (make one with "
                                    "`kvengine calibrate --budget BITS --out PLAN.json`)")
        with open(path) as f:
            return AutoPlan.from_dict(json.load(f))

    def format_table(self) -> str:
        rows = [f"{'layer':>5}  {'bits K/V':>8}  {'G':>4}  {'keys':>7}  {'rotate':>6}  {'reorder':>7}  {'error':>9}  "
                f"{'eff bits':>8}"]
        for i, c in enumerate(self.layers):
            s = c.scheme
            km = "token" if s.k_mode == "per_token" else "channel"
            rows.append(f"{i:>5}  {s.bits_k:>4}/{s.bits_v:<3}  {s.group_size:>4}  {km:>7}  {s.rotate:>6}  "
                        f"{str(s.reorder):>7}  {c.error:>9.4f}  {c.eff_bits:>8.3f}")
        rows.append(f"average effective bits {self.effective_bits:.3f} (budget {self.budget_bits})")
        val = self.meta.get("validation")
        if val:
            rows.append("calibration-text PPL: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(val.items(),
                                                                                            key=lambda kv: kv[1]))
                        + f" -> chosen: {self.meta.get('chosen')}")
        return "\n".join(rows)


def choose(errors: Sequence[dict], budget_bits: float) -> list:
    """Multiple-choice knapsack by Lagrangian relaxation: for a price λ per bit every layer takes
    argmin(error + λ·bits); λ is bisected to the smallest price whose average bits meet the budget.
    errors: per layer {Scheme: (error, bits)}.  Returns one Scheme per layer."""
    def pick(lam):
        return [min(e, key=lambda s: (e[s][0] + lam * e[s][1], e[s][1])) for e in errors]

    def avg_bits(sel):
        return sum(errors[i][s][1] for i, s in enumerate(sel)) / len(sel)

    cheapest = [min(e, key=lambda s: (e[s][1], e[s][0])) for e in errors]
    if avg_bits(cheapest) > budget_bits + 1e-9:
        raise ValueError(f"kvengine: no candidate fits a budget of {budget_bits} bits "
                         f"(the cheapest plan needs {avg_bits(cheapest):.3f})")
    sel = pick(0.0)
    if avg_bits(sel) <= budget_bits + 1e-9:
        return sel
    lo, hi = 0.0, 1.0
    while avg_bits(pick(hi)) > budget_bits + 1e-9:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if avg_bits(pick(mid)) > budget_bits + 1e-9:
            lo = mid
        else:
            hi = mid
    sel = pick(hi)
    # spend what is left of the budget greedily on the best error gain per extra bit
    improved = True
    while improved:
        improved = False
        best = None
        for i, e in enumerate(errors):
            for s, (err, bits, *_) in e.items():
                cur_err, cur_bits = e[sel[i]][:2]
                if err < cur_err and bits > cur_bits:
                    new = sel[:i] + [s] + sel[i + 1:]
                    if avg_bits(new) <= budget_bits + 1e-9:
                        gain = (cur_err - err) / (bits - cur_bits)
                        if best is None or gain > best[0]:
                            best = (gain, i, s)
        if best:
            sel[best[1]] = best[2]
            improved = True
    return sel


def measure_errors(captures: Iterable[tuple[Tensor, Tensor, Tensor]], candidates: Optional[Sequence[Scheme]] = None,
                   residual: int = 128, sinks: int = 4, progress: bool = False) -> tuple[list, list]:
    """Attention-output error and effective bits of every candidate on every layer.  captures: per layer
    (q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]).  Returns (errors: per layer {Scheme: (error, bits,
    all-quantized error)}, perms: per layer the outlier-aware key order); ``error`` is the decode-view error of
    ``scheme_error``, the third value its coarser all-quantized variant."""
    caps = list(captures)
    if not caps:
        raise ValueError("kvengine: calibration needs at least one layer")
    D = caps[0][1].shape[-1]
    cands = list(candidates or default_candidates())
    if D & (D - 1):
        cands = [s for s in cands if s.rotate == "none"]
    errors, perms = [], []
    it = caps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(caps, desc=f"calibrating {len(cands)} schemes per layer", unit="layer")
    for q, k, v in it:
        T = q.shape[2]
        full = _causal_attention(q, k, v)
        ref = full[:, :, query_positions(T, max(1, residual), MAX_QUERIES)]
        perm = outlier_perm(k)
        e = {}
        for s in cands:
            ed, ef = scheme_error(q, k, v, s, residual, sinks, ref, perm, full_ref=full)
            e[s] = (ed, s.effective_bits(D), ef)
        errors.append(e)
        perms.append(perm.tolist())
    return errors, perms


def plan_from_errors(errors: Sequence[dict], perms: Sequence[list], budget_bits: float, head_dim: int,
                     residual: int = 128, sinks: int = 4, fixed: Optional[Scheme] = None) -> AutoPlan:
    """The plan meeting ``budget_bits`` with the least summed error (``choose``), or — with ``fixed`` — the uniform
    plan using that scheme in every layer (the fixed configurations auto plans are compared against)."""
    sel = [fixed] * len(errors) if fixed is not None else choose(errors, budget_bits)
    layers = [LayerChoice(s, errors[i][s][0], errors[i][s][1], list(perms[i]) if s.reorder else None)
              for i, s in enumerate(sel)]
    table = [{s.name: v for s, v in e.items()} for e in errors]
    return AutoPlan(budget_bits, head_dim, residual, sinks, layers, table)


def plan_from_captures(captures: Iterable[tuple[Tensor, Tensor, Tensor]], budget_bits: float,
                       candidates: Optional[Sequence[Scheme]] = None, residual: int = 128, sinks: int = 4,
                       progress: bool = False) -> AutoPlan:
    """captures: per layer (q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]) from calibration text."""
    caps = list(captures)
    errors, perms = measure_errors(caps, candidates, residual, sinks, progress)
    return plan_from_errors(errors, perms, budget_bits, caps[0][1].shape[-1], residual, sinks)


# ---- plans from anywhere ------------------------------------------------------------------------------------------------
def is_auto_plan(plan) -> bool:
    """True for an ``AutoPlan``, its dict, or the path of its JSON (as opposed to a ``CalibrationPlan``)."""
    if isinstance(plan, AutoPlan):
        return True
    if isinstance(plan, dict):
        return "layers" in plan and "budget_bits" in plan
    if isinstance(plan, (str, os.PathLike)) and os.path.isfile(plan):
        try:
            with open(plan) as f:
                return is_auto_plan(json.load(f))
        except (OSError, ValueError):
            return False
    return False


def as_auto_plan(plan) -> AutoPlan:
    if isinstance(plan, AutoPlan):
        return plan
    if isinstance(plan, dict):
        return AutoPlan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return AutoPlan.load(os.fspath(plan))
    raise TypeError(f"kvengine: expected an AutoPlan, its dict or a JSON path, got {type(plan).__name__}")


# ---- real models ---------------------------------------------------------------------------------------------------------
CAPTURE_ATTN = "kvengine_capture"
_captured: Optional[dict] = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _captured is not None:
        i = getattr(module, "layer_idx", None)
        if i is None:
            i = len(_captured)
        _captured[i] = (query.detach().float().cpu(), key.detach().float().cpu(), value.detach().float().cpu())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.inference_mode()
def capture_qkv(model, ids: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Run ``model`` once on token ids [T] or [1, T] and return, per attention layer, the (post-RoPE) queries
    [1, Hq, T, D] and the keys/values [1, Hkv, T, D] its attention saw (fp32, CPU).  Uses a capturing attention
    function registered in transformers' AttentionInterface; the model's attention implementation is restored."""
    global _captured
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)
    ids = ids.view(1, -1) if ids.dim() == 1 else ids[:1]
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    prev = getattr(cfg, "_attn_implementation", None) or "sdpa"
    _captured = {}
    try:
        model.set_attn_implementation(CAPTURE_ATTN)
        model(ids.to(model.device), use_cache=False)
        caps = [_captured[i] for i in sorted(_captured)]
    finally:
        _captured = None
        model.set_attn_implementation(prev)
    if not caps:
        raise RuntimeError("kvengine.capture_qkv: the model ran no attention layer through transformers' "
                           "AttentionInterface (is it a transformers model with attn_implementation support?)")
    return caps


def calibration_ppl(model, ids: Tensor, plan: AutoPlan, prefill: Optional[int] = None, chunk: int = 8) -> float:
    """Perplexity of ``model`` on token ids [T] (one window) or [N, T] (N windows) run the way it runs in production
    with ``KVEngineCache(plan=plan)``: per window a prefill of ``prefill`` tokens (default T/4), then teacher-forced
    decode in chunks of ``chunk`` over the packed cache."""
    from .cli import teacher_forced_nll
    from .integrations.transformers import ATTN_NAME, KVEngineCache

    ids = ids.long().view(-1, ids.shape[-1])
    N, T = ids.shape
    prefill = prefill or max(1, T // 4)
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    prev = getattr(cfg, "_attn_implementation", None) or "sdpa"
    try:
        model.set_attn_implementation(ATTN_NAME)
        res = teacher_forced_nll(model, ids, lambda: KVEngineCache(model.config, plan=plan), prefill, chunk,
                                 progress=False)
    finally:
        model.set_attn_implementation(prev)
    return res["ppl"]


def candidate_plans(errors: Sequence[dict], perms: Sequence[list], budget_bits: float, head_dim: int,
                    residual: int = 128, sinks: int = 4, fixed_reorder: bool = False) -> dict:
    """{name: AutoPlan}: the per-layer knapsack plan ("per-layer") and every uniform scheme using the budget
    (``fixed_schemes``; with the key reorder variants if ``fixed_reorder``)."""
    out = {"per-layer": plan_from_errors(errors, perms, budget_bits, head_dim, residual, sinks)}
    if all(len(v) > 2 for e in errors for v in e.values()):  # the same knapsack on the all-quantized errors
        alt = [{s: (v[2], v[1]) for s, v in e.items()} for e in errors]
        p = plan_from_errors(alt, perms, budget_bits, head_dim, residual, sinks)
        if [c.scheme for c in p.layers] != [c.scheme for c in out["per-layer"].layers]:
            for c, e in zip(p.layers, errors):
                c.error = e[c.scheme][0]  # report the decode-view error like every other plan
            out["per-layer (all-quantized error)"] = p
    for s in fixed_schemes(budget_bits, head_dim, candidates=list(errors[0])):
        if s.reorder and not fixed_reorder:
            continue
        out[f"fixed {s.name}"] = plan_from_errors(errors, perms, budget_bits, head_dim, residual, sinks, fixed=s)
    return out


def upgrade_plan(errors: Sequence[dict], perms: Sequence[list], base: Scheme, budget_bits: float, head_dim: int,
                 residual: int = 128, sinks: int = 4) -> Optional[AutoPlan]:
    """The uniform plan of ``base`` with its left-over budget spent greedily: repeatedly the (layer, scheme) change
    with the largest error reduction per extra bit that still fits, until none does.  A conservative per-layer plan:
    it departs from a validated uniform scheme only where the measured error gain is largest.  None when nothing
    fits or nothing lowers an error."""
    L = len(errors)
    cur = [base] * L
    slack = budget_bits * L - sum(errors[i][base][1] for i in range(L))
    changed = False
    while True:
        best = None
        for i in range(L):
            e0, b0 = errors[i][cur[i]][:2]
            for s, v in errors[i].items():
                gain, cost = e0 - v[0], v[1] - b0
                if gain <= 0 or cost <= 1e-12 or cost > slack + 1e-9:
                    continue
                if best is None or gain / cost > best[0]:
                    best = (gain / cost, i, s, cost)
        if best is None:
            break
        _, i, s, cost = best
        cur[i] = s
        slack -= cost
        changed = True
    if not changed:
        return None
    layers = [LayerChoice(s, errors[i][s][0], errors[i][s][1], list(perms[i]) if s.reorder else None)
              for i, s in enumerate(cur)]
    table = [{s.name: v for s, v in e.items()} for e in errors]
    return AutoPlan(budget_bits, head_dim, residual, sinks, layers, table)


def select_plan(model, ids: Tensor, plans: dict, progress: bool = False, errors: Optional[Sequence[dict]] = None,
                perms: Optional[Sequence[list]] = None) -> tuple[str, AutoPlan, dict]:
    """The plan with the lowest calibration perplexity (``calibration_ppl``): the per-layer errors rank schemes
    within a layer well, but do not say exactly how much each layer's error costs the model, so the knapsack plan is
    checked against the uniform schemes of the same budget on the calibration text before it is trusted.  With
    ``errors``/``perms`` (from ``measure_errors``) and a uniform winner, that scheme with its left-over budget spent
    (``upgrade_plan``) is validated too and taken if it is better.
    Returns (name, plan, {name: ppl})."""
    ppl = {}
    items = list(plans.items())
    it = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc="validating plans on the calibration text", unit="plan")
    for name, p in it:
        ppl[name] = calibration_ppl(model, ids, p)
    best = min(ppl, key=lambda n: (ppl[n], not n.startswith("per-layer")))
    plan = plans[best]
    if errors is not None and best.startswith("fixed "):
        # a uniform scheme won: also try it with its left-over budget spent on the layers that gain most
        base = plan.layers[0].scheme
        up = upgrade_plan(errors, perms, base, plan.budget_bits, plan.head_dim, plan.residual, plan.sinks)
        if up is not None:
            name = f"{best} + upgrades"
            ppl[name] = calibration_ppl(model, ids, up)
            if ppl[name] < ppl[best]:
                best, plan = name, up
    return best, plan, ppl


def calibrate(model, text, budget_bits: float = 2.5, *, tokenizer=None, n_tokens: int = 1024,
              candidates: Optional[Sequence[Scheme]] = None, residual: int = 128, sinks: int = 4,
              validate: bool = True, progress: bool = True, model_name: Optional[str] = None,
              valid_windows: int = 2) -> AutoPlan:
    """Per-layer automatic configuration from calibration text.

    ``text``: a string (tokenized with ``tokenizer``) or token ids; ``n_tokens`` of it are used (a few hundred to a
    thousand: keep it disjoint from any evaluation text).  Each layer's queries/keys/values are captured in full
    precision; every candidate scheme (``default_candidates()``: 2/4 bits for K and V, groups 32/64/128, rotation of
    none/keys/values/both, outlier-aware key reorder) is applied to the layer with the real cache code and scored by
    the relative error of the layer's attention output as a decode reads the cache; per layer the scheme with the
    lowest error is chosen such that the average effective bits of the packed part (codes + fp16 scale/zero) meet
    ``budget_bits``.  With ``validate`` (default) that plan and every uniform scheme of the same budget are run on
    ``valid_windows`` windows of ``n_tokens`` of the text (the first one is the captured text; the others follow
    it, as far as the text reaches) through the real cache and the one with the lowest perplexity is returned
    (``plan.meta["validation"]`` holds the perplexities, ``plan.meta["chosen"]`` the winner).
    Returns an ``AutoPlan`` (``.save(path)``, ``.format_table()``, ``KVEngineCache(config, plan=...)``)."""
    import time

    t0 = time.perf_counter()
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("kvengine.calibrate: pass tokenizer= to calibrate on a string")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    elif isinstance(text, Tensor):
        ids = text.flatten().long()
    else:
        raise TypeError(f"kvengine.calibrate: text must be a str or a tensor of token ids, got {type(text).__name__}")
    if ids.numel() < 64:
        raise ValueError(f"kvengine.calibrate: need at least 64 calibration tokens, got {ids.numel()}")
    n = min(n_tokens, ids.numel())
    nv = max(1, min(valid_windows, ids.numel() // n))
    valid_ids = ids[: nv * n].view(nv, n)
    ids = ids[:n]
    caps = capture_qkv(model, ids)
    D = caps[0][1].shape[-1]
    errors, perms = measure_errors(caps, candidates, residual, sinks, progress)
    del caps
    meta = {"model": model_name, "tokens": int(ids.numel()), "num_layers": len(errors),
            "validation_tokens": int(valid_ids.numel()) if validate else 0}
    if validate:
        cands = candidate_plans(errors, perms, budget_bits, D, residual, sinks)
        name, plan, ppl = select_plan(model, valid_ids, cands, progress, errors, perms)
        meta.update(chosen=name, validation={k: round(v, 4) for k, v in ppl.items()})
    else:
        plan = plan_from_errors(errors, perms, budget_bits, D, residual, sinks)
        meta["chosen"] = "per-layer"
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    plan.meta = meta
    return plan
