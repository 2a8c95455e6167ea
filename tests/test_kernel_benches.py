"""The kernel benchmarks' baselines and rows: the SDPA forms they time must be the same attention, and the decode
rows of `bench binary` must time what they say."""
import pytest
import torch

from kvengine import benchmarks
from kvengine.benchmarks import binary

from conftest import assert_rows_close, outlier_randn


@pytest.mark.parametrize("B,Hkv,g,N,D", [(1, 2, 4, 37, 64), (3, 1, 7, 300, 32), (2, 8, 1, 5, 128)])
def test_sdpa_grouped_is_the_gqa_attention(B, Hkv, g, N, D, gen):
    q = outlier_randn(B, Hkv * g, 1, D, generator=gen, dtype=torch.float64)
    k, v = (outlier_randn(B, Hkv, N, D, generator=gen, dtype=torch.float64) for _ in range(2))
    kk, vv = (t.repeat_interleave(g, dim=1) for t in (k, v))
    ref = torch.softmax(q @ kk.transpose(-1, -2) / D ** 0.5, -1) @ vv
    # the grouping checked in float64, where rounding cannot hide a wrong head mapping: the same attention as
    # enable_gqa and as the explicit per-head reference
    got = benchmarks.sdpa_grouped(q, k, v)
    assert got.shape == q.shape and got.dtype == torch.float64
    assert_rows_close(got, benchmarks.sdpa_gqa(q, k, v), 1e-10)
    assert_rows_close(got, ref, 1e-10)
    # float32, as the benchmarks run it. Logits here reach the thousands, and fp32 rounding of a logit s moves the
    # output by ~eps * |s|: 1e-5 failed 1 run in 5 (measured up to 2e-4 over 1500 seeds), a wrong grouping is O(1)
    got32 = benchmarks.sdpa_grouped(q.float(), k.float(), v.float())
    assert got32.dtype == torch.float32
    assert_rows_close(got32, ref, 2e-3)
    with pytest.raises(AssertionError, match="one query token"):
        benchmarks.sdpa_grouped(torch.randn(B, Hkv * g, 2, D), k, v)


def test_best_sdpa_decode_reports_the_faster_form(gen):
    q, k, v = torch.randn(1, 8, 1, 64, generator=gen), torch.randn(1, 2, 64, 64, generator=gen), torch.randn(1, 2, 64, 64, generator=gen)
    r = benchmarks.best_sdpa_decode(q, k, v, "cpu", repeat=3, min_time=0.0)
    assert r["sdpa_s"] * 1e6 == pytest.approx(min(r["sdpa_grouped_us"], r["sdpa_enable_gqa_us"]))
    assert r["sdpa_form"] == ("grouped" if r["sdpa_grouped_us"] <= r["sdpa_enable_gqa_us"] else "enable_gqa")


def test_binary_decode_rows():
    rows = binary.rows_list()
    rows.append({"mode": "prefill-row"})  # decode rows go after the rows already there (a stop keeps both)
    out = binary.run_decode("cpu", contexts=(300, 700), dims=(64,), Hq=8, Hkv=2, quick=True, rows=rows)
    assert len(out) == 2 and rows[1:] == out and rows[0] == {"mode": "prefill-row"}
    for r, L in zip(out, (300, 700)):
        assert r["mode"] == "decode" and r["L"] == L and r["D"] == 64 and (r["Hq"], r["Hkv"]) == (8, 2)
        for key in ("binary_packed_ms", "tile_path_ms", "sdpa_ms", "sdpa_gqa_ms", "speedup_vs_sdpa", "split_vs_tile",
                    "GBps"):
            assert r[key] > 0, key
        # bytes: fp32 V, one bit per key channel, one fp32 scale per key
        nbytes = 2 * L * 64 * 4 + 2 * L * 64 // 8 + 2 * L * 4
        assert r["GBps"] == pytest.approx(nbytes / (r["binary_packed_ms"] * 1e-3) / 1e9)


def test_attention_rows_time_the_int8_path_too():
    """`bench attention` rows (CPU): the exact kernel, SDPA, dequantize+SDPA, per-token keys, and the same cache with
    qk_int8, each a positive time; the cache is left with qk_int8 off."""
    from kvengine.benchmarks import attention

    rows = attention.run("cpu", contexts=(300,), batches=(1,), bits=(2,), hkv=2, g=2, D=64, quick=True)
    assert len(rows) == 1
    r = rows[0]
    for key in ("kvengine_us", "sdpa_us", "deq_sdpa_us", "ktok_us", "qk8_us"):
        assert r[key] > 0, key
    assert r["qk8_speedup"] == pytest.approx(r["kvengine_us"] / r["qk8_us"])
    assert r["qk8_vs_sdpa"] == pytest.approx(r["sdpa_us"] / r["qk8_us"])
    assert (r["Hkv"], r["g"], r["D"]) == (2, 2, 64)
    # a second shape (as the CPU run adds SmolLM2's) appends to the same list
    both = attention.run("cpu", contexts=(200,), batches=(1,), bits=(4,), hkv=1, g=3, D=32, quick=True, rows=rows)
    assert both is rows and len(rows) == 2 and rows[0] is r
    assert (rows[1]["Hkv"], rows[1]["g"], rows[1]["D"], rows[1]["bits"]) == (1, 3, 32, 4)
