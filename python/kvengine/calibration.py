"""Calibration for KVEngineCache from a few hundred tokens of text (RotateKV-style).

``calibrate(model, text_ids)`` runs the model once in full precision and derives, per layer:

* **key (and value) channel permutations for the rotation** — RotateKV's outlier-aware reordering: channels are
  ranked by their max |k| (normalized per head by the median channel), and the ranked channels are dealt out so that
  consecutive outliers land in Hadamard blocks as far apart as possible (bit-reversed rank order; with a smaller
  ``block`` they are interleaved across the blocks).  Because kvengine's FWHT spans the whole head, a permutation
  only changes which signed combinations the outliers fall into; the calibration therefore also measures, on the
  calibration keys, the group-quantization error after ``fwht(x[..., perm])`` for the identity, the outlier-aware
  order and a few seeded random orders, and keeps the best (identity → no permutation stored).
* **attention sinks by massive activations** — tokens whose hidden-state max |h| is ``sink_ratio`` × the median
  token's in most of the middle layers (Sun et al., "Massive activations"; RotateKV / KVSink).  The leading sink
  count becomes ``sinks`` in the plan; sinks found beyond the first tokens switch on runtime detection
  (``sink_detect``: ``detect_sinks`` on each prompt's keys).

The plan is a small JSON file (``save_plan`` / ``load_plan``); ``KVEngineCache(config, plan=...)`` accepts the
dict, a ``CalibrationPlan`` or the file path.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .integrations._hf import cache_kwargs

PLAN_VERSION = 1


@dataclass
class CalibrationPlan:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens: int
    bits: int
    group_size: int
    sinks: int
    sink_positions: list = field(default_factory=list)
    sink_detect: Optional[dict] = None
    k_perm: list = field(default_factory=list)  # per layer: None or a list of head_dim ints
    v_perm: list = field(default_factory=list)
    k_err_gain: list = field(default_factory=list)  # per layer: quantization MSE of the chosen perm / identity
    v_err_gain: list = field(default_factory=list)
    k_outlier_ratio: list = field(default_factory=list)  # per layer: max/median channel |k|
    model: Optional[str] = None
    seconds: float = 0.0
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> str:
        return save_plan(self, path)


def save_plan(plan, path: str) -> str:
    d = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, separators=(",", ":"))
    return path


def load_plan(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"kvengine: calibration plan '{path}' does not exist (make one with "
                                "`kvengine calibrate --out PLAN.json`)")
    with open(path) as f:
        d = json.load(f)
    if d.get("version") != PLAN_VERSION:
        raise ValueError(f"kvengine: calibration plan '{path}' has version {d.get('version')}, expected "
                         f"{PLAN_VERSION}")
    return d


# ---- permutations -------------------------------------------------------------------------------------------------------
def _bit_reverse(i: int, nbits: int) -> int:
    r = 0
    for _ in range(nbits):
        r = (r << 1) | (i & 1)
        i >>= 1
    return r


def outlier_aware_perm(score: Tensor, block: Optional[int] = None) -> Tensor:
    """Permutation p (``x[..., p]``) that spreads the channels with the largest ``score`` evenly: with ``block``
    smaller than D, rank r goes to block r mod (D/block) (round-robin interleave); within the whole transform the
    ranks are placed in bit-reversed order, so consecutive outliers are as far apart as possible."""
    D = score.numel()
    order = torch.argsort(score.float(), descending=True)
    nbits = max(1, (D - 1).bit_length())
    if block is not None and block < D:
        nb = D // block
        slots = [(r % nb) * block + r // nb for r in range(D)]
    elif D & (D - 1) == 0:
        slots = [_bit_reverse(r, nbits) for r in range(D)]
    else:
        slots = list(range(D))
    p = torch.empty(D, dtype=torch.long)
    p[torch.tensor(slots)] = order  # slot s takes channel order[rank]
    return p


def _quant_mse(x: Tensor, perm: Optional[Tensor], bits: int, group: int, mode: str) -> float:
    """Mean squared quantization error of fwht(x[..., perm]) (= the error in the original space: FWHT is
    orthonormal).  x [H, T, D] with T a multiple of group for per-channel mode."""
    xr = ops.fwht(x.float().contiguous(), None, perm)
    codes, s, z = ops.quantize_pack(xr, bits, group, mode, torch.float16)
    xh = ops.dequantize(codes, s, z, bits, group, mode, torch.float32)
    return float(((xh - xr) ** 2).mean())


def _choose_perm(x: Tensor, score: Tensor, bits: int, group: int, mode: str, n_random: int,
                 gen: torch.Generator) -> tuple[Optional[Tensor], float]:
    D = x.shape[-1]
    cands = [None, outlier_aware_perm(score), outlier_aware_perm(score, block=max(16, D // 4))]
    cands += [torch.randperm(D, generator=gen) for _ in range(n_random)]
    errs = [_quant_mse(x, p, bits, group, mode) for p in cands]
    best = min(range(len(cands)), key=lambda i: errs[i])
    return cands[best], errs[best] / max(errs[0], 1e-30)


def _channel_score(x: Tensor) -> Tensor:
    """x [H, T, D] -> per-channel outlier score [D]: max over heads of max_t|x| / median-channel max_t|x|."""
    a = x.abs().amax(1)  # [H, D]
    a = a / a.median(-1, keepdim=True).values.clamp_min(1e-12)
    return a.amax(0)


# ---- sinks --------------------------------------------------------------------------------------------------------------
def massive_activation_tokens(hidden_states, ratio: float = 20.0, min_layer_frac: float = 0.5) -> list[int]:
    """Token positions whose max |h| >= ``ratio`` × the median token's in at least ``min_layer_frac`` of the middle
    layers (hidden_states: per-layer [1, T, C])."""
    L = len(hidden_states)
    mids = hidden_states[max(1, L // 4): max(2, (3 * L) // 4)]
    votes = None
    for h in mids:
        s = h[0].abs().amax(-1).float()  # [T]
        hit = s >= ratio * s.median()
        votes = hit.int() if votes is None else votes + hit.int()
    if votes is None:
        return []
    return [int(i) for i in (votes >= max(1, int(min_layer_frac * len(mids)))).nonzero().flatten()]


# ---- main entry ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def calibrate(model, text_ids: Tensor, bits: int = 2, group_size: int = 32, default_sinks: int = 4,
              sink_ratio: float = 20.0, n_random: int = 4, seed: int = 0, values: bool = True,
              model_name: Optional[str] = None, verbose: bool = False) -> CalibrationPlan:
    """Calibrate on ``text_ids`` ([T] or [1, T] token ids; a few hundred tokens, a multiple of ``group_size`` is
    used).  Runs the model once in full precision.  Returns a ``CalibrationPlan``."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    ids = text_ids.view(1, -1) if text_ids.dim() == 1 else text_ids[:1]
    T = ids.shape[1] // group_size * group_size
    if T < group_size:
        raise ValueError(f"calibrate: need at least group_size={group_size} tokens, got {ids.shape[1]}")
    ids = ids[:, :T].to(model.device)
    cache = DynamicCache()
    out = model(ids, **cache_kwargs(model, cache), use_cache=True, output_hidden_states=True)
    hs = [h.float().cpu() for h in out.hidden_states]
    massive = massive_activation_tokens(hs, sink_ratio)
    # leading sinks: the first massive tokens that are contiguous from position 0 (count them), others are "extra"
    lead = 0
    while lead in massive:
        lead += 1
    extra = [p for p in massive if p >= max(lead, default_sinks)]
    gen = torch.Generator().manual_seed(seed)
    k_perm, v_perm, k_gain, v_gain, k_ratio = [], [], [], [], []
    H = D = None
    layers = [l for l in cache.layers]
    for li, layer in enumerate(layers):
        k = layer.keys[0].float().cpu()  # [H, T, D]
        v = layer.values[0].float().cpu()
        H, _, D = k.shape
        score = _channel_score(k)
        k_ratio.append(float(score.max()))
        p, g = _choose_perm(k, score, bits, group_size, "per_channel", n_random, gen)
        k_perm.append(None if p is None else p.tolist())
        k_gain.append(round(g, 4))
        if values:
            vg = min(group_size, D)
            pv, gv = _choose_perm(v, _channel_score(v), bits, vg, "per_token", n_random, gen)
            v_perm.append(None if pv is None else pv.tolist())
            v_gain.append(round(gv, 4))
        else:
            v_perm.append(None)
            v_gain.append(1.0)
        if verbose:
            print(f"  layer {li:2d}: max/median |k| channel {score.max():5.1f}  k-err x{g:.3f}  "
                  f"v-err x{v_gain[-1]:.3f}")
    plan = CalibrationPlan(
        num_layers=len(layers), num_kv_heads=H, head_dim=D, tokens=T, bits=bits, group_size=group_size,
        sinks=max(lead, 1) if massive else default_sinks, sink_positions=massive,
        sink_detect=({"top": min(8, len(extra) + 2), "min_ratio": 4.0} if extra else None),
        k_perm=k_perm, v_perm=v_perm, k_err_gain=k_gain, v_err_gain=v_gain, k_outlier_ratio=k_ratio,
        model=model_name, seconds=round(time.perf_counter() - t0, 2))
    return plan
