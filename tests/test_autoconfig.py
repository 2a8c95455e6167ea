"""Per-layer automatic configuration: the measured choice follows the data; budgets hold; plans round-trip."""
import json

import pytest
import torch

from kvengine.autoconfig import (AutoPlan, Scheme, choose, default_candidates, outlier_perm,
                                 plan_from_captures, scheme_error)
from kvengine.integrations._hf import cache_kwargs

B, H, G_, T, D = 1, 2, 3, 256, 64


def layer(kind, gen):
    if kind == "outlier_channels":  # a few channels 12x larger in keys and queries: rotation evens them out
        k = torch.randn(B, H, T, D, generator=gen)
        k[..., ::16] *= 12
    elif kind == "token_offsets":  # every token's key has its own offset (σ = 6): a per-token zero point absorbs it,
        # per-channel groups of 32 tokens must span the offsets' spread
        k = torch.randn(B, H, T, D, generator=gen) + 6 * torch.randn(B, H, T, 1, generator=gen)
    else:  # bounded near-binary channels (as per-head-normalized keys can be): 2-bit per-channel is ~exact
        k = torch.sign(torch.randn(B, H, T, D, generator=gen)) * (torch.rand(D, generator=gen) * 3 + 0.5)
    idx = torch.randint(0, T, (T,), generator=gen)
    q = (0.15 * k[:, :, idx] / k.std() + 0.5 * torch.randn(B, H, T, D, generator=gen)).repeat_interleave(G_, 1)
    v = torch.randn(B, H, T, D, generator=gen)
    return q, k, v


# min/max quantization: the synthetic layers are built for the rotation question (the key range search, the default
# quantizer, also tames outlier channels and makes the outcome on the first layer depend on the draw)
ROT_ONLY = [Scheme(2, 2, 32, r, clip="none") for r in ("none", "k", "v", "kv")]


def test_rotation_chosen_where_it_wins_and_not_where_it_loses(gen):
    qa, ka, va = layer("outlier_channels", gen)
    qb, kb, vb = layer("binary", gen)
    plan = plan_from_captures([(qa, ka, va), (qb, kb, vb)], budget_bits=8, candidates=ROT_ONLY, residual=16,
                              sinks=0)
    assert plan.layers[0].scheme.rotate in ("k", "kv"), plan.format_table()
    assert plan.layers[1].scheme.rotate in ("none", "v"), plan.format_table()
    # and the measured errors say why
    ea = {s.rotate: scheme_error(qa, ka, va, s, 16, 0) for s in ROT_ONLY}
    eb = {s.rotate: scheme_error(qb, kb, vb, s, 16, 0) for s in ROT_ONLY}
    assert ea["k"] < ea["none"] and eb["k"] > eb["none"]


def test_key_mode_chosen_where_it_wins(gen):
    """Keys per token win on keys whose offset varies token to token; per channel (KIVI) wins on keys with fixed
    per-channel ranges.  Both candidates cost the same bits here (G = 32 tokens vs 32 channels)."""
    cands = [Scheme(2, 2, 32, "none", clip="none", k_mode=m) for m in ("per_channel", "per_token")]
    assert cands[0].effective_bits(D) == cands[1].effective_bits(D)
    qa, ka, va = layer("token_offsets", gen)
    qb, kb, vb = layer("binary", gen)
    plan = plan_from_captures([(qa, ka, va), (qb, kb, vb)], budget_bits=8, candidates=cands, residual=16, sinks=0)
    assert plan.layers[0].scheme.k_mode == "per_token", plan.format_table()
    assert plan.layers[1].scheme.k_mode == "per_channel", plan.format_table()
    ea = [scheme_error(qa, ka, va, s, 16, 0) for s in cands]
    eb = [scheme_error(qb, kb, vb, s, 16, 0) for s in cands]
    assert ea[1] < 0.9 * ea[0] and eb[0] < 0.9 * eb[1], (ea, eb)
    # the per-token choice reaches the caches built from the plan
    kw = plan.cache_kwargs(0)
    assert kw["k_mode"] == "per_token" and "k_mode" not in plan.cache_kwargs(1)
    assert "K/token" in plan.layers[0].scheme.name and "token" in plan.format_table()


def test_budget_gives_more_bits_to_the_sensitive_layer_and_holds(gen):
    caps = [layer("outlier_channels", gen), layer("binary", gen), layer("outlier_channels", gen)]
    cands = [Scheme(b, b, 32, r) for b in (2, 4) for r in ("none", "kv")]
    lo = cands[0].effective_bits(D)
    hi = Scheme(4, 4, 32).effective_bits(D)
    budget = (2 * lo + hi) / 3  # room for one layer at 4 bits
    plan = plan_from_captures(caps, budget_bits=budget, candidates=cands, residual=16, sinks=0)
    assert plan.effective_bits <= budget + 1e-9
    assert sum(c.scheme.bits_k == 4 for c in plan.layers) == 1
    assert abs(plan.effective_bits - budget) < 1e-9  # the budget is used, not just respected
    assert abs(plan.effective_bits - AutoPlan.from_dict(plan.to_dict()).effective_bits) < 1e-12
    # that layer is where 4 bits buy the most error reduction
    gains = []
    for q, k, v in caps:
        best2 = min(scheme_error(q, k, v, s, 16, 0) for s in cands if s.bits_k == 2)
        best4 = min(scheme_error(q, k, v, s, 16, 0) for s in cands if s.bits_k == 4)
        gains.append(best2 - best4)
    chosen = [i for i, c in enumerate(plan.layers) if c.scheme.bits_k == 4][0]
    assert chosen == max(range(3), key=lambda i: gains[i])
    with pytest.raises(ValueError, match="no candidate fits a budget"):
        plan_from_captures(caps, budget_bits=1.0, candidates=cands, residual=16, sinks=0)


def test_plan_round_trips_through_json(tmp_path, gen):
    caps = [layer("outlier_channels", gen)]
    cands = [Scheme(2, 2, 32, "kv", True), Scheme(2, 2, 64, "v")]
    plan = plan_from_captures(caps, budget_bits=4, candidates=cands, residual=16, sinks=0)
    path = plan.save(str(tmp_path / "plan.json"))
    back = AutoPlan.load(path)
    assert back.to_dict() == json.loads(json.dumps(plan.to_dict()))
    kw = back.cache_kwargs(0)
    assert kw["residual"] == 16 and kw["sinks"] == 0
    if back.layers[0].scheme.reorder:
        assert sorted(kw["k_perm"].tolist()) == list(range(D))
    with pytest.raises(ValueError, match="version"):
        AutoPlan.from_dict({"version": 7})
    # the quantizer is part of a plan: version-2 plans keep each layer's clip; version-1 plans (made before the
    # range search existed) load as min/max, the quantizer they were measured with
    d = plan.to_dict()
    assert d["version"] == 3 and d["layers"][0]["clip"] == "auto" and kw["clip"] == "auto"
    assert d["layers"][0]["k_mode"] == "per_channel"
    # version 3 records the key mode; older plans (no such field) had per-channel keys only
    d3 = dict(d, layers=[dict(L, k_mode="per_token") for L in d["layers"]])
    assert AutoPlan.from_dict(d3).cache_kwargs(0)["k_mode"] == "per_token"
    d2 = dict(d, version=2, layers=[{k: v for k, v in L.items() if k != "k_mode"} for L in d["layers"]])
    assert AutoPlan.from_dict(d2).layers[0].scheme.k_mode == "per_channel"
    d["layers"][0]["clip"] = "kv"
    assert AutoPlan.from_dict(d).cache_kwargs(0)["clip"] == "kv"
    d1 = dict(d, version=1, layers=[{k: v for k, v in L.items() if k != "clip"} for L in d["layers"]])
    assert AutoPlan.from_dict(d1).cache_kwargs(0)["clip"] == "none"


def test_choose_is_exact_on_small_knapsacks():
    import itertools

    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        errs = []
        for _ in range(4):
            e = {}
            for b in (2, 3, 4):
                e[Scheme(b, b, 32, "none")] = (float(torch.rand(1, generator=g)) / b, float(b))
            errs.append(e)
        budget = 3.0
        sel = choose(errs, budget)
        got = sum(errs[i][s][0] for i, s in enumerate(sel))
        best = min(sum(errs[i][s][0] for i, s in enumerate(c)) for c in itertools.product(*[list(e) for e in errs])
                   if sum(errs[i][s][1] for i, s in enumerate(c)) / 4 <= budget + 1e-9)
        assert sum(errs[i][s][1] for i, s in enumerate(sel)) / 4 <= budget + 1e-9
        assert got <= best * 1.25 + 1e-9  # Lagrangian + greedy fill: near-optimal


def test_outlier_perm_is_a_permutation_and_spreads_outliers(gen):
    k = torch.randn(2, 64, 128, generator=gen)
    k[..., [3, 4, 5, 6]] *= 50
    p = outlier_perm(k)
    assert sorted(p.tolist()) == list(range(128))
    pos = [p.tolist().index(c) for c in (3, 4, 5, 6)]
    assert min(abs(a - b) for a in pos for b in pos if a != b) >= 16
    assert len(default_candidates()) > 10


# ---- wiring: capture from a real transformers model, per-layer plans in the caches, rotate="auto" -----------------
def tiny_llama(seed=0, layers=3, head_dim=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("sdpa")
    return m


@torch.inference_mode()
def test_capture_qkv_sees_what_the_model_attends(gen):
    from transformers import DynamicCache

    from kvengine.autoconfig import capture_qkv

    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 70), generator=gen)
    caps = capture_qkv(model, ids)
    assert len(caps) == 3 and model.config._attn_implementation == "sdpa"  # restored
    cache = DynamicCache()
    ref_logits = model(ids, **cache_kwargs(model, cache), use_cache=True).logits
    for i, (q, k, v) in enumerate(caps):
        assert q.shape == (1, 4, 70, 32) and k.shape == v.shape == (1, 2, 70, 32)
        torch.testing.assert_close(k, cache.layers[i].keys.float())
        torch.testing.assert_close(v, cache.layers[i].values.float())
    # the captured queries are post-RoPE: attention over them reproduces the layer's attention output
    layer0 = model.model.layers[0].self_attn
    outs = {}
    h = layer0.o_proj.register_forward_pre_hook(lambda m, a: outs.setdefault("x", a[0]))
    model(ids)
    h.remove()
    q, k, v = caps[0]
    att = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    torch.testing.assert_close(att.transpose(1, 2).reshape(1, 70, -1), outs["x"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(ids).logits, ref_logits)


@torch.inference_mode()
def test_auto_plan_configures_each_layer_of_kvengine_cache(tmp_path, gen):
    import kvengine
    from kvengine.integrations.transformers import KVEngineCache, KVEngineLayer

    model = tiny_llama()
    calib = torch.randint(0, 256, (300,), generator=gen)
    cands = [Scheme(4, 4, 32, "kv", True), Scheme(2, 2, 32, "none"), Scheme(2, 2, 64, "v"), Scheme(4, 2, 32, "k")]
    plan = kvengine.calibrate(model, calib, budget_bits=3.6, candidates=cands, residual=16, sinks=2,
                              progress=False)
    assert len(plan.layers) == 3 and plan.effective_bits <= 3.6 + 1e-9
    assert plan.meta["chosen"].startswith("per-layer") and "per-layer" in plan.meta["validation"]
    assert set(plan.meta["validation"]) <= {"per-layer", "per-layer (all-quantized error)"}
    assert plan.meta["tokens"] == 300 and plan.meta["num_layers"] == 3
    assert plan.meta["validation_tokens"] == 300  # one window: the text holds no second one
    # a longer text: captured on the first 150 tokens, validated on 2 windows of 150 (the second never captured)
    p2 = kvengine.calibrate(model, calib, budget_bits=3.6, candidates=cands, residual=16, sinks=2, progress=False,
                            n_tokens=150, valid_windows=2)
    assert p2.meta["tokens"] == 150 and p2.meta["validation_tokens"] == 300
    from kvengine.autoconfig import calibration_ppl
    two = calibration_ppl(model, calib.view(2, 150), p2)
    one = [calibration_ppl(model, calib[i * 150 : (i + 1) * 150], p2) for i in range(2)]
    assert min(one) - 1e-9 <= two <= max(one) + 1e-9  # the pooled PPL of the two windows
    assert p2.meta["validation"][p2.meta["chosen"]] == pytest.approx(two, rel=1e-3)
    model.set_attn_implementation("kvengine")
    ids = torch.randint(0, 256, (1, 150), generator=gen)
    ref = model(ids).logits
    path = plan.save(str(tmp_path / "auto.json"))
    logits = []
    for p in (plan, path, json.loads(open(path).read())):
        cache = KVEngineCache(model.config, plan=p)
        out = [model(ids[:, :40], **cache_kwargs(model, cache), use_cache=True).logits]
        for s in range(40, 150, 7):
            out.append(model(ids[:, s:s + 7], **cache_kwargs(model, cache), use_cache=True).logits)
        logits.append(torch.cat(out, 1))
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer, KVEngineLayer)
            s, qc = plan.layers[i].scheme, layer.qcache
            assert (qc.bits_k, qc.bits_v, qc.G, qc.R, qc.S) == (s.bits_k, s.bits_v, s.group_size, 16, 2)
            assert (qc.rotate_k, qc.rotate_v) == (s.rotate in ("k", "kv"), s.rotate in ("v", "kv"))
            assert (qc.k_perm is not None) == s.reorder
            if s.reorder:
                assert qc.k_perm.tolist() == plan.layers[i].k_perm
            assert qc.n_quant > 0
    torch.testing.assert_close(logits[1], logits[0])
    torch.testing.assert_close(logits[2], logits[0])
    err = ((logits[0] - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert err < 0.3, err  # 2/4-bit on a random model: close, not equal
    with pytest.raises(ValueError, match="rotate='auto'"):
        KVEngineCache(model.config, plan=plan, rotate=True)
    bad = plan.to_dict()
    bad["layers"] = bad["layers"][:2]
    with pytest.raises(ValueError, match="auto plan has 2 layers"):
        KVEngineCache(model.config, plan=bad)
    bad = dict(plan.to_dict(), head_dim=64)
    with pytest.raises(ValueError, match="head_dim 64"):
        KVEngineCache(model.config, plan=bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoPlan.load(str(tmp_path / "missing.json"))


def test_quantized_cache_from_plan_and_auto_default(gen):
    from kvengine import QuantizedKVCache
    from kvengine.cache import DEFAULT_ROTATE

    c = QuantizedKVCache(2, 64)
    assert DEFAULT_ROTATE == "v" and (c.rotate_k, c.rotate_v) == (False, True)
    q, k, v = layer("outlier_channels", gen)
    plan = plan_from_captures([(q, k, v)], budget_bits=8, candidates=[Scheme(4, 2, 64, "kv", True)], residual=16,
                              sinks=0)
    c = QuantizedKVCache.from_plan(plan, 0, H, batch_size=B)
    assert (c.bits_k, c.bits_v, c.G, c.R, c.S, c.rotate_k, c.rotate_v) == (4, 2, 64, 16, 0, True, True)
    assert c.k_perm.tolist() == plan.layers[0].k_perm
    c.append(k, v)
    assert 16 <= c.n_res < 16 + 64 and c.n_quant == T - c.n_res
    # the plan's error is that of the same cache (all full groups quantized) read the way a decode reads it
    from kvengine.autoconfig import attention_error

    kw = plan.cache_kwargs(0)
    c0 = QuantizedKVCache(H, D, batch_size=B, **dict(kw, residual=0))
    c0.append(k, v)
    kq, vq = c0.dequantize(torch.float32)
    assert abs(attention_error(q, k, v, kq, vq, window=16) - plan.layers[0].error) < 1e-6
    with pytest.raises(ValueError, match="come from the plan"):
        QuantizedKVCache.from_plan(plan, 0, H, bits_k=2)
    with pytest.raises(ValueError, match="layer 3 is not in the plan"):
        QuantizedKVCache.from_plan(plan, 3, H)


def test_fixed_schemes_use_the_budget():
    from kvengine.autoconfig import fixed_schemes

    for budget in (2.5, 3.0, 4.25):
        fs = fixed_schemes(budget, 64)
        assert fs and all(budget - 0.5 < s.effective_bits(64) <= budget for s in fs)
        assert {s.rotate for s in fs} == {"none", "k", "v", "kv"}
    assert Scheme(2, 2, 64).effective_bits(64) == 2.5 and Scheme(2, 2, 32).effective_bits(64) == 3.0


def test_cli_auto_arguments():
    from kvengine import cli

    a = cli.build_parser().parse_args(["eval", "--auto", "--budget", "2.5,3", "--save-plan", "p.json"])
    assert a.auto and a.budget == [2.5, 3.0] and a.save_plan == "p.json"
    a = cli.build_parser().parse_args(["eval", "--rotate", "v"])
    assert a.rotate == "v"
    assert cli.build_parser().parse_args(["eval", "--rotate"]).rotate is True
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--rotate", "sideways"])
    c = cli.build_parser().parse_args(["calibrate", "--budget", "2.5", "--out", "x.json"])
    assert c.budget == 2.5 and c.tokens is None


@pytest.mark.model
def test_eval_auto_cli_on_smollm2(smollm2, tmp_path, capsys):
    """`kvengine eval --auto` end to end (tiny windows): plan table, the auto row next to the fixed rows of the same
    budget, the JSON, and a saved plan that `eval --plan` and KVEngineCache accept."""
    from kvengine import cli

    out, plan_path = tmp_path / "auto.json", tmp_path / "plan.json"
    rc = cli.main(["eval", "--auto", "--budget", "2.5", "--windows", "1", "--window-len", "256", "--prefill", "64",
                   "--residual", "32", "--calib-tokens", "256", "--quiet", "--threads", "2", "--json", str(out),
                   "--save-plan", str(plan_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "auto plan, budget 2.5 bits" in text and "budget 2.5 bits: auto plan PPL ratio" in text
    d = json.loads(out.read_text())
    kinds = [r["kind"] for r in d["rows"]]
    assert kinds[:2] == ["fp", "auto"] and kinds.count("fixed") == 16  # INT2 G64/G128 x 4 rotations x keys per channel/token
    assert set(kinds) <= {"fp", "auto", "knapsack", "fixed"}
    auto = d["rows"][1]
    assert auto["packed_bits"] <= 2.5 + 1e-9 and len(auto["plan"]["layers"]) == 30
    # captured on 256 tokens, validated on 2 windows of 256 (the captured one and the next 256 from the end)
    assert auto["plan"]["meta"]["tokens"] == 256 and auto["plan"]["meta"]["validation_tokens"] == 512
    for r in d["rows"][1:]:  # 192 decoded tokens: a 2-bit cache can even land slightly below fp by chance
        assert 0.9 < r["ppl_ratio"] < 1.5 and r["tokens"] == 255
    plan = AutoPlan.load(str(plan_path))
    assert plan.to_dict()["layers"] == auto["plan"]["layers"]
    val = plan.meta["validation"]  # the knapsack plan and the 16 uniform schemes, run on the calibration text
    assert len(val) - ("per-layer (all-quantized error)" in val) - ("+ upgrades" in " ".join(val)) == 17
    assert "per-layer" in val and any("K/token" in n for n in val)
    assert plan.meta["chosen"] == min(val, key=val.get)
    assert ("per-layer knapsack @ 2.5 (not chosen)" in text) == (plan.meta["chosen"] != "per-layer")


def test_decode_emulation_reads_the_recent_window_exactly(gen):
    from kvengine.autoconfig import _causal_attention, _decode_attention

    q, k, v = layer("outlier_channels", gen)
    kn, vn = k + torch.randn_like(k), v + torch.randn_like(v)  # "quantized" copies with large errors
    exact = _causal_attention(q, k, v)
    torch.testing.assert_close(_decode_attention(q, k, v, k, v, 16), exact, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_decode_attention(q, k, v, kn, vn, T), exact, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_decode_attention(q, k, v, kn, vn, 1)[:, :, 0], exact[:, :, 0], atol=1e-5,
                               rtol=1e-4)  # the first query sees only itself
    # window 1: every query reads its own token exactly, all older ones from the noisy copies
    g = q.shape[1] // k.shape[1]
    t = 37
    sc = torch.cat([q[:, :, t:t + 1] @ kn.repeat_interleave(g, 1)[:, :, :t].transpose(-1, -2),
                    q[:, :, t:t + 1] @ k.repeat_interleave(g, 1)[:, :, t:t + 1].transpose(-1, -2)], -1) / D ** 0.5
    p = sc.softmax(-1)
    want = p[..., :t] @ vn.repeat_interleave(g, 1)[:, :, :t] + p[..., t:] @ v.repeat_interleave(g, 1)[:, :, t:t + 1]
    torch.testing.assert_close(_decode_attention(q, k, v, kn, vn, 1)[:, :, t:t + 1], want, atol=1e-5, rtol=1e-4)
    assert (_decode_attention(q, k, v, kn, vn, 8) - exact).norm() < (_causal_attention(q, kn, vn) - exact).norm()


def test_query_positions():
    from kvengine.autoconfig import query_positions

    p = query_positions(1024, 128, 256)
    assert len(p) <= 256 and p[-1] == 1023 and p[0] >= 128 and (p.diff() == 4).all()
    assert query_positions(100, 16, 1000).tolist() == list(range(16, 100))
    assert query_positions(10, 128, 256).tolist() == [9]


def test_upgrade_plan_spends_the_left_over_budget_where_the_error_drops_most():
    from kvengine.autoconfig import upgrade_plan

    base, mid, big = Scheme(2, 2, 128, "kv"), Scheme(2, 2, 64, "kv"), Scheme(4, 4, 128, "kv")
    bits = {base: 2.375, mid: 2.5, big: 4.375}
    # layer 1 gains most from 4 bits, layer 0 a little from G64, layer 2 nothing (its 4-bit error is higher)
    err = [{base: 0.10, mid: 0.09, big: 0.05}, {base: 0.30, mid: 0.29, big: 0.05}, {base: 0.02, mid: 0.02, big: 0.03}]
    errors = [{s: (e[s], bits[s], e[s]) for s in e} for e in err]
    perms = [list(range(D))] * 3
    # budget: room for exactly one 4-bit layer (+2.0) and one G64 step (+0.125)
    budget = (3 * 2.375 + 2.0 + 0.125) / 3
    p = upgrade_plan(errors, perms, base, budget, D, 16, 0)
    assert [c.scheme for c in p.layers] == [mid, big, base]
    assert p.effective_bits <= budget + 1e-9
    # no slack, or no error that drops: nothing to upgrade
    assert upgrade_plan(errors, perms, base, 2.375, D, 16, 0) is None
    flat = [{s: (0.1, bits[s], 0.1) for s in e} for e in err]
    assert upgrade_plan(flat, perms, base, 3.5, D, 16, 0) is None
