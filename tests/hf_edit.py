"""Checks shared by the transformers caches' tests: beam-search reorder, batch selection/repetition and crop must
leave exactly the cache that the edited history would have built (tiny models, exact logits)."""
import torch

from kvengine.integrations._hf import cache_kwargs


def _step(model, ids, cache):
    return model(ids, **cache_kwargs(model, cache), use_cache=True).logits


def _ids(B, n, seed):
    return torch.randint(0, 256, (B, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def check_row_edits(model, make_cache, prompt=40, decoded=12):
    """reorder_cache / batch_select_indices / batch_repeat_interleave (through the Cache, every layer) on a cache
    with quantized tokens, then more decode steps: the logits equal those of a fresh cache that saw the edited
    batch from the start (to rounding: the fresh cache's prefill runs at another batch size)."""
    B = 3
    p, d = _ids(B, prompt, 1), _ids(B, decoded, 2)
    a = make_cache()
    _step(model, p, a)
    for t in range(decoded):
        _step(model, d[:, t : t + 1], a)
    edits = [("reorder_cache", torch.tensor([2, 0, 0, 1])), ("batch_select_indices", torch.tensor([0, 3])),
             ("batch_repeat_interleave", 3)]
    for i, (name, arg) in enumerate(edits):
        getattr(a, name)(arg)
        sel = torch.arange(p.shape[0]).repeat_interleave(arg) if isinstance(arg, int) else arg
        p, d = p[sel], d[sel]  # each row's history, in the edited order
        b = make_cache()
        _step(model, p, b)
        for t in range(d.shape[1]):
            _step(model, d[:, t : t + 1], b)
        more = _ids(len(sel), 4, 10 + i)
        for t in range(more.shape[1]):
            la = _step(model, more[:, t : t + 1], a)
            lb = _step(model, more[:, t : t + 1], b)
            # a fresh cache's prefill ran on another batch size: the GEMMs round differently in the last bit
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}, step {t}: {m}")
        d = torch.cat([d, more], 1)
    return a


@torch.inference_mode()
def check_crop(model, make_cache, prompt=40, draft=6, keep=2):
    """A draft block appended in one forward, then ``crop(-(draft - keep))``, then decode: the logits equal those of
    a cache that only ever saw the kept tokens (when the draft block flushed nothing), and crop's legacy absolute
    form (``crop(max_length)``) drops exactly the same.

    The fresh cache computed the kept tokens' K/V in a forward of ``keep`` rows, the cropped one in a forward of
    ``draft`` rows: BLAS rounds a GEMM's row differently with the row count on some CPUs (MKL on an AVX-512 Xeon:
    1.8e-7 in the logits), so that comparison is to rounding.  A cache cropped one token short (a dropped token still
    attended) must miss it by far more than the tolerance, or the check would be blind."""
    p, d, more = _ids(2, prompt, 5), _ids(2, draft, 6), _ids(2, 4, 7)
    tol = dict(atol=1e-5, rtol=1e-5)
    out, logits = [], []
    for legacy in (False, True):
        a, b, c = make_cache(), make_cache(), make_cache()
        for x in (a, b, c):
            _step(model, p, x)
        _step(model, d, a)
        _step(model, d, c)
        a.crop(prompt + keep if legacy else -(draft - keep))
        c.crop(prompt + keep + 1 if legacy else -(draft - keep - 1))
        assert a.get_seq_length() == prompt + keep and c.get_seq_length() == prompt + keep + 1
        _step(model, d[:, :keep], b)
        run = []
        for t in range(more.shape[1]):
            la, lb = _step(model, more[:, t : t + 1], a), _step(model, more[:, t : t + 1], b)
            torch.testing.assert_close(la, lb, **tol, msg=lambda m: f"legacy={legacy}, step {t}: {m}")
            if t == 0:  # the control: one dropped token too few
                lc = _step(model, more[:, :1], c)
                assert (lc - lb).abs().max() > 100 * tol["atol"], (lc - lb).abs().max()
            run.append(la)
        logits.append(torch.stack(run))
        out.append(a)
    assert torch.equal(logits[0], logits[1])  # both forms of crop: the same forwards, the same cache
    return out[0]


@torch.inference_mode()
def padded_logits(model, cache, prompts, steps, chunk=1):
    """A left-padded batch of prompts: prefill, then forced random tokens, ``chunk`` per row per forward (position
    ids from the mask, as generate makes them).  -> (per row the logits of its real positions [L_b + steps, V], the forced
    tokens [B, steps])."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    outs = [model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True).logits]
    nxt = torch.randint(0, 256, (B, steps), generator=torch.Generator().manual_seed(9))
    for t in range(0, steps, chunk):
        c = min(chunk, steps - t)
        mask = torch.cat([mask, torch.ones(B, c, dtype=torch.long)], 1)
        pos = pos[:, -1:] + 1 + torch.arange(c)
        outs.append(model(nxt[:, t : t + c], attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache),
                          use_cache=True).logits)
    full = torch.cat(outs, 1)
    return [full[b, T - len(p):] for b, p in enumerate(prompts)], nxt
