"""transformers integration: KVEngineCache + the "kvengine" attention.

Fast tests use tiny randomly initialised Llama / Gemma-3 models (no downloads).  Tests marked ``model`` run the real
SmolLM2-135M through the same code path as ``kvengine eval`` (they fail, not skip, without the model packages).
"""
import math

import pytest
import torch

import transformers  # noqa: E402  (the package extra `models`: CI installs it; missing it is a failure)

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvengine.integrations.transformers import KVEngineCache, KVEngineLayer  # noqa: E402

from conftest import assert_rows_close  # noqa: E402
from hf_edit import check_crop, check_row_edits, padded_logits  # noqa: E402
from kvengine.integrations._hf import cache_kwargs


def tiny_llama(seed=0, layers=2, head_dim=32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("kvengine")
    return m


def run_chunks(model, ids, cache, prefill, chunk):
    outs = [model(ids[:, :prefill], **cache_kwargs(model, cache), use_cache=True).logits]
    for s in range(prefill, ids.shape[1], chunk):
        outs.append(model(ids[:, s:s + chunk], **cache_kwargs(model, cache), use_cache=True).logits)
    return torch.cat(outs, 1)


@torch.inference_mode()
def test_dynamic_cache_keeps_fp_semantics():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    got = run_chunks(model, ids, DynamicCache(), 16, 5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("chunk", [1, 8, 13])
@pytest.mark.parametrize("k_mode", ["per_channel", "per_token"])
def test_kvengine_cache_tracks_fp(chunk, k_mode):
    """8-bit packed cache, small residual so that most tokens are quantized: logits match fp closely; chunks > 8 on
    a non-empty cache go through the 8-at-a-time path.  Keys per channel (KIVI) or per token."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits
    cache = KVEngineCache(model.config, bits=8, group_size=16, residual=16, sinks=2, k_mode=k_mode)
    got = run_chunks(model, ids, cache, 24, chunk)
    assert cache.get_seq_length() == 120
    assert all(isinstance(l, KVEngineLayer) for l in cache.layers)
    q = cache.layers[0].qcache
    assert q.n_quant >= 64 and q.seq_len == 120 and q.k_mode == k_mode
    err = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert err.max() < 0.02, err.max()
    assert 0 < cache.nbytes < cache.fp_nbytes()


@torch.inference_mode()
def test_kvengine_cache_qk_int8():
    """qk_int8 reaches every layer's cache (also through an auto plan's summary) and the logits stay within a small
    distance of the exact kernel's on the same 4-bit cache (most tokens quantized)."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(4))
    kw = dict(bits=4, group_size=16, residual=16, sinks=2)
    exact = run_chunks(model, ids, KVEngineCache(model.config, **kw), 24, 8)
    cache = KVEngineCache(model.config, qk_int8=True, **kw)
    got = run_chunks(model, ids, cache, 24, 8)
    assert cache.config_summary["qk_int8"] is True
    assert all(l.qcache.qk_int8 for l in cache.layers) and cache.layers[0].qcache.n_quant >= 64
    err = (got - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert 0 < err.max() < 0.02, err.max()


@torch.inference_mode()
def test_generate_with_kvengine_cache_tiny():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=40, do_sample=False, min_new_tokens=40, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    ref = model.generate(ids, **cache_kwargs(model, DynamicCache()), **kw)
    cache = KVEngineCache(model.config, bits=8, group_size=16, residual=16, sinks=2)
    out = model.generate(ids, **cache_kwargs(model, cache), **kw)
    assert out.shape == ref.shape
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is never fed back
    assert (out[0, :36] == ref[0, :36]).float().mean() > 0.9


@pytest.mark.parametrize("fp_layers", [(), (1,)])
def test_beam_search_reorder_and_batch_edits_are_exact(fp_layers):
    """reorder_cache (beam search), batch_select_indices and batch_repeat_interleave on a cache whose packed part is
    in use (and one full-precision layer): decoding goes on exactly as from a cache that saw the edited batch."""
    model = tiny_llama()
    c = check_row_edits(model, lambda: KVEngineCache(model.config, bits=4, group_size=16, residual=16, sinks=2,
                                                     fp_layers=fp_layers))
    q = c.layers[0].qcache
    assert q.B == 6 and q.n_quant >= 32


def test_crop_drops_rejected_draft_tokens_exactly():
    """crop (assisted / prompt-lookup decoding) of draft tokens still in the full-precision window: exactly the cache
    that never saw them; cropping into the quantized part raises a clear error; residual=0 is not croppable."""
    model = tiny_llama()
    c = check_crop(model, lambda: KVEngineCache(model.config, bits=4, group_size=16, residual=16, sinks=2))
    assert c.is_croppable and c.layers[0].qcache.n_quant >= 16
    with torch.inference_mode(), pytest.raises(ValueError, match="still in the full-precision recent window"):
        c.crop(-(c.layers[0].qcache.n_res + 1))
    with pytest.raises(ValueError, match="cannot remove 1000000 tokens from a cache of 46"):
        c.crop(-(10**6))
    assert not KVEngineCache(model.config, bits=4, residual=0).is_croppable
    with pytest.raises(ValueError):
        KVEngineCache(model.config, bits=3)


@torch.inference_mode()
@pytest.mark.parametrize("k_mode", ["per_channel", "per_token"])
def test_left_padded_batch_equals_each_sequence_alone(k_mode):
    """A left-padded batch decodes every row as that prompt alone would (the cache drops the padding and holds rows of
    unequal length; one kernel call per step), through flushes; the rows flush together, so row b alone is given a
    residual window longer by its extra length."""
    model = tiny_llama()
    lens = [52, 37, 20]
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(20 + n)) for n in lens]
    kw = dict(bits=8, group_size=16, sinks=2, k_mode=k_mode)
    cache = KVEngineCache(model.config, residual=16, **kw)
    rows, nxt = padded_logits(model, cache, prompts, 40)
    q = cache.layers[0].qcache
    assert q.row_lens == [n + 40 for n in lens] and q.n_quant >= 32
    for b, p in enumerate(prompts):
        alone = KVEngineCache(model.config, residual=16 + lens[b] - min(lens), **kw)
        ref = run_chunks(model, torch.cat([p, nxt[b]])[None], alone, len(p), 1)[0]
        assert_rows_close(rows[b], ref, 2e-4)
    # a beam-style reorder of the ragged cache keeps each row's own length
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.layers[0].qcache.row_lens == [60, 60, 92]
    # a mask that does not match what the cache holds is refused
    with pytest.raises(NotImplementedError, match="only left padding of the prompt"):
        bad = torch.cat([torch.zeros(3, 10, dtype=torch.long), torch.ones(3, 83, dtype=torch.long)], 1)
        model(torch.zeros(3, 1, dtype=torch.long), attention_mask=bad, **cache_kwargs(model, cache), use_cache=True)


@torch.inference_mode()
def test_gemma3_sliding_layers_fall_back_to_fp():
    """Gemma-family layout (MQA, head_dim 256, sliding-window layers): full-attention layers are packed, sliding
    layers keep an fp sliding-window cache, with a note."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # in every supported version (>= 4.56)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=512)
    model = Gemma3ForCausalLM(cfg).eval()
    model.set_attn_implementation("kvengine")
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(4))
    ref = model(ids).logits
    cache = KVEngineCache(model.config, bits=8, group_size=16, residual=16, sinks=2)
    got = run_chunks(model, ids, cache, 24, 8)
    kinds = [type(l).__name__ for l in cache.layers]
    assert kinds.count("KVEngineLayer") == 2 and cache.notes
    err = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert err.max() < 0.02, err.max()


# ---- real model ------------------------------------------------------------------------------------------------------
# PPL gates run 2 windows x 768 tokens (prefill 256, decode chunks of 8) instead of `kvengine eval`'s default
# 4 x 1024 to keep the real-model tests under ~5 minutes on 2 cores: each window still decodes 512 tokens through
# the packed cache, of which up to ~600 are quantized (R=128, S=4), so the quantization error dominates the tail.
GATE_WINDOWS, GATE_LEN, GATE_PREFILL = 2, 768, 256


@pytest.fixture(scope="module")
def ppl_rows(smollm2):
    from kvengine import cli, models

    win = models.windows(smollm2.tokenizer, GATE_WINDOWS, GATE_LEN)
    rows = cli.eval_configs(bits=(4, 2), groups=(32,), residual=128, sinks=4, rotate=True, baseline=True,
                            quanto=False)
    rows += [r for r in cli.eval_configs(bits=(2,), groups=(128,), residual=128, sinks=4, rotate=True,
                                         baseline=True, quanto=False) if r["kind"] != "fp"]
    res = cli.run_eval(smollm2, win, rows, prefill=GATE_PREFILL, chunk=8, progress=False)
    for r in res:
        print(f"{r['config']:40s} ppl {r['ppl']:.3f} ratio {r['ppl_ratio']:.4f} time {r['time_s']:.1f}s")
    return {(r["kind"], r.get("bits"), r.get("group_size")): r for r in res}


@pytest.mark.model
@torch.inference_mode()
def test_generate_int4_matches_fp_greedy(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    model.set_attn_implementation("kvengine")
    ids = tok("The history of the Roman Empire begins", return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=tok.eos_token_id)
    ref = model.generate(ids, **cache_kwargs(model, DynamicCache()), **kw)[0, ids.shape[1]:]
    # small residual/sinks so that the packed part is really used within the first tokens
    cache = KVEngineCache(model.config, bits=4, group_size=16, residual=8, sinks=2)
    out = model.generate(ids, **cache_kwargs(model, cache), **kw)[0, ids.shape[1]:]
    assert cache.layers[0].qcache.n_quant > 0
    n_same = int((out == ref).long().cumprod(0).sum())
    assert n_same >= 16, f"first {n_same} tokens agree:\n{tok.decode(ref)!r}\n{tok.decode(out)!r}"


@pytest.mark.model
@pytest.mark.parametrize("bits,group,limit", [(4, 32, 1.01), (2, 32, 1.04), (2, 128, 1.06)])
def test_ppl_gates(ppl_rows, bits, group, limit):
    ours = ppl_rows[("kvengine", bits, group)]
    kivi = ppl_rows[("kivi", bits, group)]
    fp = ppl_rows[("fp", None, None)]
    assert math.isfinite(fp["ppl"]) and 5 < fp["ppl"] < 40
    assert ours["ppl_ratio"] <= limit, (ours["config"], ours["ppl_ratio"])
    assert ours["ppl"] < kivi["ppl"], (ours["ppl"], kivi["ppl"])
    assert ours["effective_bits"] < 32 * 0.6


@pytest.mark.model
@torch.inference_mode()
def test_beam_search_and_prompt_lookup_on_smollm2(smollm2, monkeypatch):
    """generate(num_beams=3) and prompt-lookup decoding (draft tokens verified, the rejected ones cropped) with a
    cache whose packed part is in use: the same tokens as the fp cache's beam search / greedy decode.  8-bit, because
    this prompt ends in a list of names where the 135M model is nearly tied: INT4 with R=64 flips a name after 9
    tokens even in plain greedy decoding, which says nothing about reorder or crop (a wrong reorder garbles the
    beams from the first step)."""
    from kvengine.integrations.binary import load_summaries

    model, tok = smollm2.model, smollm2.tokenizer
    model.set_attn_implementation("kvengine")
    ids = tok(" ".join(t[1] for t in load_summaries(3)), return_tensors="pt")["input_ids"][:, :300]
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=tok.eos_token_id)
    crops = []
    orig = KVEngineLayer.crop
    monkeypatch.setattr(KVEngineLayer, "crop", lambda self, n: (crops.append(n), orig(self, n))[1])

    def agree(a, b):
        return int((a == b).long().cumprod(0).sum())

    for extra in (dict(num_beams=3), dict(prompt_lookup_num_tokens=6)):
        ref = model.generate(ids, **cache_kwargs(model, DynamicCache()), **kw, **extra)[0, ids.shape[1]:]
        cache = KVEngineCache(model.config, bits=8, group_size=32, residual=64, sinks=4)
        out = model.generate(ids, **cache_kwargs(model, cache), **kw, **extra)[0, ids.shape[1]:]
        assert cache.layers[0].qcache.n_quant >= 192
        assert agree(out, ref) >= 14, (extra, tok.decode(ref), tok.decode(out))
    assert sum(1 for n in crops if n) >= 2 * model.config.num_hidden_layers  # drafts were rejected and cropped


@pytest.mark.model
@torch.inference_mode()
def test_left_padded_batch_generate_on_smollm2(smollm2):
    """generate() on a left-padded batch of 3 Wikipedia prompts (55–208 tokens) with an INT4 cache: each row gives
    the tokens of that prompt alone, with the residual window that row has in the batch (longer by its extra length,
    since the rows flush together)."""
    from kvengine.integrations.binary import load_summaries

    model, tok = smollm2.model, smollm2.tokenizer
    model.set_attn_implementation("kvengine")
    texts = [t[1] for t in load_summaries(3)]
    prompts = [texts[0][:900], texts[1][:500], texts[2][:200]]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    L = enc["attention_mask"].sum(1).tolist()
    assert len(set(L)) == 3
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    cache = KVEngineCache(model.config, bits=4, group_size=32, residual=32)
    out = model.generate(**enc, **cache_kwargs(model, cache), **kw)[:, enc["input_ids"].shape[1]:]
    q = cache.layers[0].qcache
    assert q.row_lens == [n + 15 for n in L] and q.n_quant >= 32
    for b, p in enumerate(prompts):
        one = tok(p, return_tensors="pt")
        alone = KVEngineCache(model.config, bits=4, group_size=32, residual=32 + L[b] - min(L))
        ref = model.generate(**one, **cache_kwargs(model, alone), **kw)[0, one["input_ids"].shape[1]:]
        n_same = int((out[b] == ref).long().cumprod(0).sum())
        assert n_same >= 12, (b, tok.decode(ref), tok.decode(out[b]))
