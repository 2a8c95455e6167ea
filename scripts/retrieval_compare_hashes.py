"""Perplexity of top-k decode with two sets of trained hashes, and their paired ratio (B / A) per k.

Same windows and decode as `kvengine retrieval-eval` (2 × 2048 tokens from the start of the text, prefill 512,
chunks of 32, sinks 4, recent 32): rows full attention, A at each k, B at each k.  The paired standard error comes
from the per-token NLL differences of the same tokens (`kvengine.cli.paired_ratio`).

  .venv/bin/python scripts/retrieval_compare_hashes.py --a h.pt --b h_e2e.pt --json out.json
"""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="hashes A (save_hashes file)")
    ap.add_argument("--b", required=True, help="hashes B")
    ap.add_argument("--top-k", default="64,128,256")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window-len", type=int, default=2048)
    ap.add_argument("--text", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from kvengine import models
    from kvengine.cli import paired_ratio
    from kvengine.integrations import retrieval as R

    lm = models.load_model(verbose=False)
    win = models.windows(lm.tokenizer, args.windows, args.window_len, args.text)
    ks = [int(x) for x in args.top_k.split(",")]
    rows = [r for r in R.retrieval_eval_rows(ks, lsh=False, oracle=False, trained=True)]
    res = {}
    for name, path in (("A", args.a), ("B", args.b)):
        rr = rows if name == "A" else [r for r in rows if r["kind"] != "full"]
        res[name] = R.run_retrieval_eval(lm, win, rr, trained_hashes=R.load_hashes(path), progress=False)
    full = res["A"][0]
    out = []
    for a in res["A"][1:]:
        b = next(x for x in res["B"] if x["top_k"] == a["top_k"])
        ra, _ = paired_ratio(a["_token_nll"], full["_token_nll"])
        rb, _ = paired_ratio(b["_token_nll"], full["_token_nll"])
        ratio, se = paired_ratio(b["_token_nll"], a["_token_nll"])
        row = {"top_k": a["top_k"], "ppl_ratio_a": ra, "ppl_ratio_b": rb, "b_over_a": ratio, "b_over_a_se": se}
        out.append(row)
        print(f"k={a['top_k']}: A {ra:.4f}  B {rb:.4f}  B/A {ratio:.4f} ± {se:.4f} (paired se)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "full_ppl": full["ppl"], "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
