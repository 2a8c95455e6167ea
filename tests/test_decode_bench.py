"""`kvengine bench decode`: the bulk-loaded caches it times must be the caches a real prefill would build."""
import pytest
import torch

from kvengine import models
from kvengine.benchmarks import decode
from kvengine.integrations._hf import cache_kwargs


@pytest.mark.model
def test_bulk_loaded_caches_decode_like_their_own_prefill(smollm2):
    from transformers import DynamicCache

    net, tok = smollm2.model, smollm2.tokenizer
    # 301 tokens: past the sinks + recent window + one group (packed tokens exist) and past top_k (selection active)
    ids = models.token_ids(tok, 301)[None]
    prompt, nxt = ids[:, :-1], ids[:, -1:]
    bulk = decode.prefilled(net, prompt)
    assert list(bulk) == list(decode.CONFIGS)
    logits = {}
    with torch.no_grad():
        for name in decode.CONFIGS:
            cache, attn = bulk[name]
            net.set_attn_implementation(attn)
            a = net(input_ids=nxt, **cache_kwargs(net, cache), use_cache=True).logits[0, -1]
            own, attn2 = (DynamicCache(), "sdpa") if name == "fp" else decode._make(name, net.config)
            assert attn2 == attn
            net(input_ids=prompt, **cache_kwargs(net, own), use_cache=True)
            b = net(input_ids=nxt, **cache_kwargs(net, own), use_cache=True).logits[0, -1]
            assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (name, (a - b).abs().max().item())
            assert cache.get_seq_length() == own.get_seq_length() == 301, name
            logits[name] = a
    net.set_attn_implementation("sdpa")
    # every compressed / sparse config really changed the attention (the comparison above is not fp vs fp)
    for name in decode.CONFIGS[1:]:
        assert (logits[name] - logits["fp"]).abs().max() > 1e-3, name


@pytest.mark.model
def test_decode_bench_rows(smollm2):
    rows = decode.run("cpu", contexts=(200,), rounds=1, steps=1, model=smollm2, progress=False, batch=(1, 3))
    assert [(r["batch"], r["config"]) for r in rows] == [(b, c) for b in (1, 3) for c in decode.CONFIGS]
    for r in rows:
        assert r["context"] == 200 and r["ms_per_token"] > 0 and r["speedup_vs_fp"] > 0 and r["steps_timed"] == 1
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_token"])
    for b in (1, 3):
        by = {r["config"]: r for r in rows if r["batch"] == b}
        assert by["fp"]["speedup_vs_fp"] == 1.0
        assert by["kvengine INT2"]["kv_MB"] < by["kvengine INT4"]["kv_MB"] < by["fp"]["kv_MB"]
    # a batch of 3 holds three sequences' keys and values
    fp = {r["batch"]: r["kv_MB"] for r in rows if r["config"] == "fp"}
    assert fp[3] == pytest.approx(3 * fp[1], rel=0.02)


@pytest.mark.model
def test_bulk_loaded_batch_decodes_like_each_sequence_alone(smollm2):
    """The batched caches of `bench decode --batch`: row b of a batched step = that text decoded on its own."""
    net, tok = smollm2.model, smollm2.tokenizer
    ids = models.windows(tok, 2, 260)
    nxt = torch.full((2, 1), 11, dtype=torch.long)
    batched = decode.prefilled(net, ids)
    with torch.no_grad():
        for name in decode.CONFIGS:
            cache, attn = batched[name]
            net.set_attn_implementation(attn)
            a = net(input_ids=nxt, **cache_kwargs(net, cache), use_cache=True).logits[:, -1]
            for b in range(2):
                alone, _ = decode.prefilled(net, ids[b:b + 1], names=(name,))[name]
                net.set_attn_implementation(attn)
                one = net(input_ids=nxt[b:b + 1], **cache_kwargs(net, alone), use_cache=True).logits[0, -1]
                assert torch.allclose(a[b], one, atol=2e-4, rtol=1e-4), (name, b, (a[b] - one).abs().max().item())
    net.set_attn_implementation("sdpa")


def test_decode_bench_rejects_bad_batch_sizes():
    with pytest.raises(SystemExit, match="batch sizes must be >= 1"):
        decode.run("cpu", contexts=(64,), batch=(2, 0))
    with pytest.raises(SystemExit):
        decode.main(["--batch", "x"])


def test_decode_bench_refuses_cuda():
    with pytest.raises(SystemExit, match="CPU only"):
        decode.run("cuda", contexts=(64,))
