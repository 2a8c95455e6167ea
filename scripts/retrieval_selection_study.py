"""Which top-k selection costs SmolLM2 the least perplexity, and do per-layer fidelity metrics predict it?

A research script (docs/design.md, "Top-k selection: attention mass is not perplexity"), not part of the library.

  ppl       teacher-forced PPL ratio to full attention with every layer's decoded queries (positions >= --prefill)
            attending only their top-k, all in ONE parallel forward per config: a masked dense attention, which is
            what `kvengine retrieval-eval`'s chunked decode computes (it reproduces its rows: same windows, same
            sinks/recent rule, hash ties to the lower position).  --layers: one layer at a time instead.
  open-loop per layer, on 256 query positions of the first 2048 tokens: attention mass kept (group mean), relative
            error of the attention output, and its norm relative to full attention's; across layers, how much the
            free picks (not sinks / recent) of adjacent layers overlap (Jaccard, union over KV heads) and how many
            distinct free tokens all layers pick together.

Selections ("rankers"):  mass = softmax weight summed over the GQA group (RetrievalCache selector="oracle");
logit = logits summed over the group ("oracle_logit"); cos = cosine of q and k summed over the group; perhead = each
query head its own top-k by its own weight (not a shared selection); lsh / trained = Hamming similarity of the
128-bit codes summed over the group (trained: --hashes FILE from `kvengine retrieval-eval --train --save-hashes`).

  .venv/bin/python scripts/retrieval_selection_study.py ppl --rankers mass,logit,cos,perhead,lsh --hashes h.pt
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F


def unpack(codes):
    """int32 codes [..., W] -> ±1 floats [..., 32W] (bit set = -1)."""
    bits = (codes[..., None] >> torch.arange(32, dtype=torch.int32)) & 1
    return 1.0 - 2.0 * bits.flatten(-2).float()


def rank_scores(name, q, k, s, hashes, layer, g):
    """Ranking scores [B, Hkv, Tq, Tk] (or [B, Hq, Tq, Tk] for perhead) of query i for key j; higher = kept
    first.  q [B, Hq, Tq, D], k [B, Hkv, Tk, D], s the scaled logits [B, Hq, Tq, Tk]."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = Hq // g, k.shape[2]
    shape = (B, Hkv, g, Tq, Tk)
    if name == "mass":
        return torch.softmax(s, -1).view(shape).sum(2)
    if name == "logit":
        return s.view(shape).sum(2)
    if name == "cos":
        kn = F.normalize(k.float(), dim=-1).repeat_interleave(g, 1)
        return (F.normalize(q.float(), dim=-1) @ kn.transpose(-1, -2)).view(shape).sum(2)
    if name == "perhead":
        return s
    h = hashes[name][layer]
    kc = unpack(h.encode_keys(k.float()))  # [B, Hkv, T, nb]
    qc = unpack(h.encode_queries(q.float()))  # [B, Hq, T, nb]
    nb = kc.shape[-1]
    sim = (nb + qc.view(B, Hkv, g, Tq, nb) @ kc[:, :, None].transpose(-1, -2)) / 2
    return sim.sum(2) - torch.arange(Tk).float() / (Tk + 1)  # equal similarity: the lower position first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("ppl", "open-loop"))
    ap.add_argument("--rankers", default="mass,logit,lsh")
    ap.add_argument("--hashes", default=None, help="trained hashes (save_hashes file): adds the 'trained' ranker")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--layers", action="store_true", help="ppl: top-k in one layer at a time")
    ap.add_argument("--tail", default="none",
                    help="ppl: comma list of what stands in for the unselected keys (the tail): none | exact (the "
                         "true tail term: must give ratio 1) | mass (the true tail mass on the tail's mean value) | "
                         "summary (one pseudo-token: the tail's mean key with logit + log n_tail, its mean value) | "
                         "sample:M (M tail keys drawn uniformly without replacement, attended with their true logits "
                         "and weight n_tail/M: an unbiased estimate of the tail's numerator and denominator, as in "
                         "MagicPIG; same cost as top-(k+M)) | isample:M (M draws with replacement, probability ∝ the ranker's "
                         "estimate of the group's softmax weight, weight count/(M·probability))")
    ap.add_argument("--seed", type=int, default=0, help="ppl: seed of the tail samples (--tail sample:M)")
    ap.add_argument("--text", default=None, help="plain-text file (default: Wikipedia summaries), as retrieval-eval")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    from kvengine import models, ops
    from kvengine.integrations import retrieval as R
    from kvengine.retrieval import sample_positions

    lm = models.load_model(verbose=False)
    m, tok = lm.model, lm.tokenizer
    cfg = m.config
    L, Hq, Hkv, D = R._head_dims(cfg)
    g = Hq // Hkv
    hashes = {"lsh": R.lsh_hashes(cfg, 128, 0)}
    if args.hashes:
        hashes["trained"] = R.load_hashes(args.hashes)
    rankers = args.rankers.split(",")
    kk, S, Rc = args.top_k, args.sinks, args.recent
    out = {"args": vars(args), "rows": []}

    if args.mode == "ppl":
        state = {}

        def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
            li = module.layer_idx
            B, _, T, _ = query.shape
            j = torch.arange(T)
            causal = j[None, :] > j[:, None]
            s = (query.float() @ key.float().repeat_interleave(g, 1).transpose(-1, -2)) * scaling
            s = s.masked_fill(causal, float("-inf"))
            name = state.get(li)
            if name is not None:
                r = rank_scores(name, query, key, s, hashes, li, g)
                end = j[:, None] + 1
                forced = (j[None, :] < S) | ((j[None, :] >= end - Rc) & (j[None, :] < end))
                r = r.masked_fill(forced, float("inf")).masked_fill(causal, float("-inf"))
                keep = torch.zeros(r.shape, dtype=torch.bool).scatter_(-1, r.topk(kk, -1).indices, True)
                keep = (keep | (j[:, None] < args.prefill)) & ~causal  # prompt queries: full attention
                if keep.shape[1] != Hq:
                    keep = keep.repeat_interleave(g, 1)
                tail_mode = state.get("tail", "none")
                if tail_mode != "none":
                    return tail_attention(tail_mode, query, key, value, s, keep, ~causal, scaling, name, li)
                s = s.masked_fill(~keep, float("-inf"))
            o = torch.softmax(s, -1) @ value.float().repeat_interleave(g, 1)
            return o.to(query.dtype).transpose(1, 2).contiguous(), None

        def proposal(name, query, key, s, li, scaling):
            """Group-level sampling weights [B, Hkv, T, T] (unnormalised) for --tail isample: the ranker's estimate of
            each key's softmax weight, summed over the group.  Oracles use the true weights; hash rankers the logit
            each code implies, scaling·|q|·|k|·cos(π·hamming/nbits) (a kernel would keep |k| beside the codes)."""
            B_, Hq_, T_, _ = s.shape
            if name not in hashes:
                return torch.softmax(s, -1).view(B_, Hq_ // g, g, T_, T_).sum(2)
            h = hashes[name][li]
            kc = unpack(h.encode_keys(key.float()))  # [B, Hkv, T, nb]
            qc = unpack(h.encode_queries(query.float()))  # [B, Hq, T, nb]
            nb = kc.shape[-1]
            agree = (qc.view(B_, Hq_ // g, g, T_, nb) @ kc[:, :, None].transpose(-1, -2)) / nb  # cos of the angle
            est = torch.cos(math.pi * (1 - agree) / 2) * scaling
            est = est * query.float().norm(dim=-1).view(B_, Hq_ // g, g, T_, 1)
            est = est * key.float().norm(dim=-1)[:, :, None, None, :]
            causal_ = torch.arange(T_)[None, :] > torch.arange(T_)[:, None]
            return torch.softmax(est.masked_fill(causal_, float("-inf")), -1).sum(2)

        def tail_attention(mode, query, key, value, s, keep, visible, scaling, name, li):
            """Attention over the kept keys plus a stand-in for the visible keys that were not kept (the tail)."""
            vv, kf = value.float().repeat_interleave(g, 1), key.float().repeat_interleave(g, 1)
            tail = (visible & ~keep).float()  # [B, Hq, T, T]
            nt = tail.sum(-1, keepdim=True)
            has = nt > 0
            vbar = (tail @ vv) / nt.clamp(min=1)  # the tail's mean value
            if mode == "exact":
                o = torch.softmax(s, -1) @ vv  # = kept part + tail part with the true weights
            elif mode == "mass":
                m_tail = (torch.softmax(s, -1) * tail).sum(-1, keepdim=True)
                o = (1 - m_tail) * (torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ vv) + m_tail * vbar
            elif mode == "summary":
                kbar = (tail @ kf) / nt.clamp(min=1)
                lt = ((query.float() * kbar).sum(-1, keepdim=True) * scaling + nt.clamp(min=1).log())
                lt = lt.masked_fill(~has, float("-inf"))
                w = torch.softmax(torch.cat([s.masked_fill(~keep, float("-inf")), lt], -1), -1)
                o = w[..., :-1] @ vv + w[..., -1:] * vbar
            elif mode.startswith("sample:"):
                M = int(mode.split(":", 1)[1])
                B_, Hq_, T_, _ = s.shape
                # one draw per query row and KV head (the group shares its selection, as a kernel would)
                u = torch.rand((B_, Hq_ // g, T_, T_), generator=state["gen"]).repeat_interleave(g, 1)
                u = u.masked_fill(tail == 0, -1.0)
                pick = torch.zeros_like(keep).scatter_(-1, u.topk(min(M, T_), -1).indices, True) & (tail > 0)
                w = nt / nt.clamp(max=M).clamp(min=1)  # 1 / inclusion probability
                sl = torch.where(keep, s, torch.where(pick, s + w.log(), float("-inf")))
                o = torch.softmax(sl, -1) @ vv
            elif mode.startswith("isample:"):
                M = int(mode.split(":", 1)[1])
                B_, Hq_, T_, _ = s.shape
                tg = tail.view(B_, Hq_ // g, g, T_, T_)[:, :, 0]  # the group's tail (shared selection)
                pr = proposal(name, query, key, s, li, scaling) * tg
                empty = pr.sum(-1, keepdim=True) <= 0
                pr = torch.where(empty, torch.ones_like(pr), pr)
                pr = pr / pr.sum(-1, keepdim=True)
                # M draws with replacement; a key drawn c times gets weight c / (M·π): unbiased for the tail's sums
                draws = torch.multinomial(pr.view(-1, T_), M, replacement=True, generator=state["gen"])
                c = torch.zeros(draws.shape[0], T_).scatter_add_(-1, draws, torch.ones(draws.shape)).view(pr.shape)
                c = (c * tg).masked_fill(empty, 0)
                lw = torch.where(c > 0, (c / (M * pr)).log(), float("-inf")).repeat_interleave(g, 1)
                sl = torch.where(keep, s, s + lw)
                o = torch.softmax(sl, -1) @ vv
            else:
                raise SystemExit(f"--tail: unknown mode {mode!r}")
            return o.to(query.dtype).transpose(1, 2).contiguous(), None

        AttentionInterface.register("kvengine_study", attn)
        AttentionMaskInterface.register("kvengine_study", sdpa_mask)
        m.set_attn_implementation("kvengine_study")
        win = models.windows(tok, args.windows, 2048, args.text)

        @torch.inference_mode()
        def nll(sel):
            state.clear()
            state.update(sel)
            state["gen"] = torch.Generator().manual_seed(args.seed)
            tot = []
            for w in win:
                lg = m(w[None], use_cache=False).logits[0, :-1].float()
                tot.append(F.cross_entropy(lg, w[1:], reduction="none").double())
            return torch.cat(tot)

        full = nll({})
        print(f"full attention PPL {math.exp(float(full.mean())):.3f} ({full.numel()} tokens)", flush=True)
        for tail_mode in args.tail.split(","):
            for name in rankers:
                for layers in ([[i] for i in range(L)] if args.layers else [list(range(L))]):
                    d = nll({"tail": tail_mode, **{i: name for i in layers}}) - full
                    row = {"ranker": name, "tail": tail_mode, "layers": layers if args.layers else "all",
                           "top_k": kk, "ppl_ratio": math.exp(float(d.mean())),
                           "se": float(d.std()) / math.sqrt(d.numel())}
                    print(f"{name:8s} tail {tail_mode:7s} layers {str(row['layers']):5s} k={kk}: PPL ratio "
                          f"{row['ppl_ratio']:.4f} ± {row['se']:.4f}", flush=True)
                    out["rows"].append(row)
    else:
        N = 2048
        ids = models.token_ids(tok, N, args.text).view(-1)[:N]
        vcap = {}
        hooks = [l.self_attn.v_proj.register_forward_hook(lambda mod, a, o, i=i: vcap.__setitem__(i, o.detach()))
                 for i, l in enumerate(m.model.layers)]
        caps = R.capture_qk_all(m, ids)
        for h in hooks:
            h.remove()
        pos = sample_positions(N, 256, args.prefill, seed=1)
        n = len(pos)
        j = torch.arange(N)
        picked = {name: [] for name in rankers}  # per layer: [n, N] free tokens picked by any KV head
        for li in range(L):
            q, k = caps[li]  # [Hq, N, D], [Hkv, N, D] post-RoPE
            v = vcap[li][0].view(N, Hkv, D).transpose(0, 1).float()
            qg = q.float().reshape(Hkv, g, N, D)[:, :, pos]
            s = (qg @ k.float().transpose(-1, -2)[:, None] / math.sqrt(D)).masked_fill(j > pos[:, None],
                                                                                      float("-inf"))
            p = torch.softmax(s, -1)
            o = p @ v[:, None]
            end = pos[:, None] + 1
            forced = (j < S) | ((j >= end - Rc) & (j < end))
            row = {"layer": li}
            for name in rankers:
                if name in hashes:
                    h = hashes[name][li]
                    kc = h.encode_keys(k.float()[None])
                    qc = h.encode_queries(q.float()[None][:, :, pos])[0].transpose(0, 1).contiguous()
                    idx, _ = ops.hamming_topk(qc, kc.expand(n, -1, -1, -1), kk, (pos + 1).to(torch.int32),
                                              keep=(S, Rc))
                    gi = idx.long().permute(1, 0, 2)[:, None].expand(Hkv, g, n, kk)
                else:
                    r = rank_scores(name, qg.reshape(1, Hq, n, D), k[None], s.reshape(1, Hq, n, N), {}, li, g)
                    r = r.reshape(-1, g if name == "perhead" else 1, n, N)  # [Hkv, g|1, n, N]
                    gi = r.masked_fill(forced, float("inf")).topk(kk, -1).indices.expand(Hkv, g, n, kk)
                picked[name].append(torch.zeros(Hkv, g, n, N, dtype=torch.bool).scatter_(-1, gi, True)
                                    .flatten(0, 1).any(0) & ~forced)
                psel = torch.softmax(s.gather(-1, gi), -1)
                vsel = v[:, None, None].expand(Hkv, g, n, N, D).gather(3, gi[..., None].expand(-1, -1, -1, -1, D))
                e = (psel[..., None] * vsel).sum(-2) - o
                row[f"{name}_mass"] = p.gather(-1, gi).sum(-1).mean().item()
                row[f"{name}_err"] = (e.norm(dim=-1) / o.norm(dim=-1)).mean().item()
                row[f"{name}_norm"] = ((e + o).norm(dim=-1) / o.norm(dim=-1)).mean().item()
            print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
            out["rows"].append(row)
        out["summary"] = {}
        for name in rankers:
            mean = {s_: sum(r[f"{name}_{s_}"] for r in out["rows"]) / L for s_ in ("mass", "err", "norm")}
            ss = picked[name]
            mean["adjacent_jaccard"] = sum(((ss[a] & ss[a + 1]).sum(-1) / (ss[a] | ss[a + 1]).sum(-1).clamp(min=1))
                                           .mean().item() for a in range(L - 1)) / (L - 1)
            mean["distinct_free"] = torch.stack(ss).any(0).sum(-1).float().mean().item()
            out["summary"][name] = mean
            print(f"{name:8s} mean over layers: mass {mean['mass']:.4f}, output error {mean['err']:.4f}, "
                  f"output norm / full {mean['norm']:.4f}; adjacent-layer Jaccard {mean['adjacent_jaccard']:.3f}, "
                  f"distinct free tokens {mean['distinct_free']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
