"""Fine-tune per-layer retrieval hashes end to end: on the model's output, not on each layer's attention weights.

A research script (docs/design.md, "Top-k selection: attention mass is not perplexity"), not part of the library.
`train_hash` fits every layer's hash to that layer's attention weights; docs/design.md found that keeping more
attention mass does not mean a lower perplexity, and named an objective on the model's output as the open lever.
This script tries it: starting from trained hashes (`kvengine retrieval-eval --train --save-hashes h.pt`), every
layer's decoded queries (positions >= --prefill) attend a *soft* top-k in one parallel forward:

  logits_ij += log σ((S_ij − θ_i) / --tau-select)   for the free keys j (not sinks, not the recent window)

where S_ij is the relaxed Hamming similarity summed over the query heads of the KV head's group (tanh instead of
sign, as in `train_hash`) and θ_i sits halfway between the k-th and (k+1)-th free score (detached), so the soft mask
is 1/2 at the cut.  The loss is KL(full attention's next-token distribution ‖ the soft-selected model's), the model
frozen, gradients reaching every layer's hash through the layers above it.  Every --eval-every steps the *hard*
selection (sign codes, ties to the lower position, the run-time rule) is scored by the same KL on a validation
window; the best step is saved (step 0 = the starting hashes).  Training and validation windows come from the end
of the text (as `retrieval-eval --train`), so `kvengine retrieval-eval --hashes OUT` evaluates on unseen text.

  .venv/bin/python scripts/retrieval_e2e_finetune.py --hashes h.pt --out h_e2e.pt --checkpoint
  .venv/bin/kvengine retrieval-eval --hashes h_e2e.pt --no-lsh --no-oracle
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hashes", required=True, help="starting hashes (save_hashes file)")
    ap.add_argument("--out", required=True, help="write the best hashes here")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--window", type=int, default=2048, help="training window length (tokens)")
    ap.add_argument("--prefill", type=int, default=512, help="queries before this position attend everything")
    ap.add_argument("--train-windows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tau", type=float, default=1.0, help="tanh temperature of the relaxed codes (train_hash's)")
    ap.add_argument("--tau-select", type=float, default=1.0, help="temperature of the soft top-k mask")
    ap.add_argument("--tau-select-end", type=float, default=None,
                    help="anneal the mask temperature geometrically to this value at the last step")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--text", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", action="store_true",
                    help="gradient checkpointing per decoder layer (memory for windows of 2048 tokens)")
    ap.add_argument("--json", default=None, help="write the validation curve here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    from kvengine import models
    from kvengine.integrations import retrieval as R
    from kvengine.retrieval import SpotlightHash, _project, _Weights

    lm = models.load_model(verbose=False)
    m, tok = lm.model, lm.tokenizer
    for p in m.parameters():
        p.requires_grad_(False)
    L, Hq, Hkv, D = R._head_dims(m.config)
    g = Hq // Hkv
    start = R.load_hashes(args.hashes)
    params = {}  # layer -> (key weights, query weights): lists [w1, b1, w2, b2] of trainable tensors
    for li, h in start.items():
        nb = h.nbits

        def trainable(w: _Weights):
            z = torch.zeros(Hkv, nb)
            t = [w.w1, w.b1 if w.b1 is not None else z, w.w2 if w.w2 is not None else torch.zeros(Hkv, nb, nb),
                 w.b2 if w.b2 is not None else z]
            return [x.detach().clone().float().requires_grad_() for x in t]

        params[li] = (trainable(h.k), trainable(h.q))
    kf = args.top_k - args.sinks - args.recent
    state = {"mode": "full", "tau_select": args.tau_select}

    def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        li = module.layer_idx
        T = query.shape[2]
        j = torch.arange(T)
        causal = j[None, :] > j[:, None]
        s = (query @ key.repeat_interleave(g, 1).transpose(-1, -2)) * scaling
        mode = state["mode"]
        if mode != "full" and li in params:
            pk, pq = params[li]
            end = j[:, None] + 1
            free = (j[None, :] >= args.sinks) & (j[None, :] < end - args.recent) & (j[:, None] >= args.prefill)
            if mode == "soft":
                fk = torch.tanh(_project(key[0], *pk) / args.tau)  # [Hkv, T, nb]
                fq = torch.tanh(_project(query[0].reshape(Hkv, g, T, D), *pq) / args.tau).sum(1)
                S = fq @ fk.transpose(-1, -2)  # [Hkv, T, T]
                v = S.detach().masked_fill(~free, float("-inf")).topk(kf + 1, -1).values
                theta = (v[..., kf - 1] + v[..., kf]) / 2  # -inf where a query has <= kf free keys: all kept
                logm = F.logsigmoid((S - theta[..., None]) / state["tau_select"]).masked_fill(~free, 0.0)
            else:  # hard: the run-time selection (sign codes, group-summed agreement, ties to the lower position)
                with torch.no_grad():
                    fk = torch.sign(_project(key[0], *pk))
                    fq = torch.sign(_project(query[0].reshape(Hkv, g, T, D), *pq)).sum(1)
                    S = fq @ fk.transpose(-1, -2) - j.float() / (T + 1)
                    idx = S.masked_fill(~free, float("-inf")).topk(kf, -1).indices
                    keep = torch.zeros_like(free.expand(Hkv, T, T)).scatter_(-1, idx, True) & free
                    logm = torch.zeros(Hkv, T, T).masked_fill(free & ~keep, float("-inf"))
            s = s + logm.repeat_interleave(g, 0)[None]
        s = s.masked_fill(causal, float("-inf"))
        o = torch.softmax(s, -1) @ value.repeat_interleave(g, 1)
        return o.transpose(1, 2).contiguous(), None

    AttentionInterface.register("kvengine_e2e", attn)
    AttentionMaskInterface.register("kvengine_e2e", sdpa_mask)
    m.set_attn_implementation("kvengine_e2e")
    if args.checkpoint:  # non-reentrant: the hash weights inside the layers get their gradients
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()  # transformers checkpoints only in training mode (SmolLM2 has no dropout)
    nwin = args.train_windows + 1
    ids = models.windows(tok, nwin, args.window, args.text, reverse=True)  # held out: from the end of the text
    P = args.prefill

    def logprobs(w, mode):
        state["mode"] = mode
        out = m(w.view(1, -1), use_cache=False).logits[0, P - 1: -1].float()
        return F.log_softmax(out, -1)

    with torch.no_grad():
        teacher = [logprobs(w, "full") for w in ids]

    def kl(t, s):
        return (t.exp() * (t - s)).sum(-1).mean()

    def val_kl():
        with torch.no_grad():
            return kl(teacher[-1], logprobs(ids[-1], "hard")).item()

    flat = [t for pk, pq in params.values() for t in pk + pq]
    opt = torch.optim.Adam(flat, lr=args.lr)
    best = (val_kl(), 0)
    best_w = [t.detach().clone() for t in flat]
    curve = [{"step": 0, "val_kl_hard": best[0]}]
    print(f"step 0: validation KL (hard top-{args.top_k}) {best[0]:.5f}", flush=True)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        wi = (step - 1) % args.train_windows
        if args.tau_select_end is not None and args.steps > 1:
            frac = (step - 1) / (args.steps - 1)
            state["tau_select"] = args.tau_select * (args.tau_select_end / args.tau_select) ** frac
        loss = kl(teacher[wi], logprobs(ids[wi], "soft"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"step": step, "train_kl_soft": loss.item(), "tau_select": state["tau_select"],
               "s": time.perf_counter() - t0}
        if step % args.eval_every == 0 or step == args.steps:
            row["val_kl_hard"] = val_kl()
            if row["val_kl_hard"] < best[0]:
                best = (row["val_kl_hard"], step)
                best_w = [t.detach().clone() for t in flat]
        curve.append(row)
        print(" ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    out, i = {}, 0
    for li, h in start.items():
        kw = _Weights(*best_w[i:i + 4])
        qw = _Weights(*best_w[i + 4:i + 8])
        i += 8
        out[li] = SpotlightHash(kw, qw)
    R.save_hashes(out, args.out)
    print(f"best step {best[1]} (validation KL {best[0]:.5f}, step 0: {curve[0]['val_kl_hard']:.5f}); wrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "best_step": best[1], "curve": curve}, f, indent=1)


if __name__ == "__main__":
    main()
