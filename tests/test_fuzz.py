"""Property-based fuzzing of every op against kvengine.reference (hypothesis).

KVENGINE_FUZZ_EXAMPLES (default 200) sets the number of examples per op; invalid combinations must raise a
ValueError naming the argument.  Each example draws its device: the CPU, the CUDA kernels in the emulator ("emu",
tests/cuda_emu) and a GPU when one is present."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvengine
from kvengine import ops
from kvengine import reference as ref

from conftest import EMU, HAS_CUDA, HAS_EMU, assert_rows_close, emu_ops

N_EX = int(os.environ.get("KVENGINE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=N_EX, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
DEVS = ["cpu"] + (["cuda"] if HAS_CUDA else []) + (["emu"] if HAS_EMU else [])


def use(dev: str):
    """Route kvengine.ops for this example's device; returns the device to put tensors on ("emu": EMU, which moves
    tensors to the CPU and equals "emu")."""
    ops._ops = emu_ops() if dev == "emu" else torch.ops.kvengine
    return EMU if dev == "emu" else dev


@pytest.fixture(autouse=True)
def _restore_ops():
    yield
    ops._ops = torch.ops.kvengine
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tensor(draw, shape, dtype, special=True):
    """Random data with heavy tails, sometimes constant rows, huge outliers (1e4) or exact zeros."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).clamp_min(0.05).sqrt()
    if special:
        kind = draw(st.sampled_from(["plain", "outliers", "constant", "zeros", "offset"]))
        if kind == "outliers" and x.numel():
            idx = torch.randint(0, x.numel(), (max(1, x.numel() // 97),), generator=g)
            x.view(-1)[idx] = 1e4 * torch.sign(torch.randn(idx.numel(), generator=g))
        elif kind == "constant":
            x[...] = float(draw(st.floats(-100, 100, allow_nan=False)))
        elif kind == "zeros":
            x[..., ::3] = 0.0
        elif kind == "offset":
            x = x + 1e3
    lim = 6e4 if dtype == torch.float16 else None
    if lim:
        x = x.clamp(-lim, lim)
    return x.to(dtype)


@FUZZ
@given(st.data())
def test_fuzz_fwht(data):
    draw = data.draw
    dev = use(draw(st.sampled_from(DEVS)))
    dtype = draw(st.sampled_from(DTYPES))
    n = 2 ** draw(st.integers(1, 11))
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    x = tensor(draw, (*lead, n), dtype).to(dev)
    if draw(st.booleans()) and x.dim() >= 2:
        x = x.transpose(0, -2).contiguous().transpose(0, -2)  # strided view
    scale = draw(st.sampled_from([None, 1.0, 0.125]))
    perm = torch.randperm(n).to(dev) if draw(st.booleans()) else None
    y = ops.fwht(x, scale, perm)
    e = ref.fwht(x.cpu().double(), scale, None if perm is None else perm.cpu())
    # values beyond the dtype's range overflow to ±inf exactly as a cast of the exact result does
    ovf = e.abs() > torch.finfo(dtype).max * (1 - 2 ** -(torch.finfo(dtype).bits // 2))
    assert (torch.isinf(y.cpu()) <= ovf).all() if dtype != torch.float32 else torch.isfinite(y).all()
    fin = torch.isfinite(y.cpu()) & ~ovf
    # relative error, with a floor at the dtype's smallest normal: subnormal results carry no relative precision
    floor = torch.finfo(dtype).tiny * max(1, int(fin.sum())) ** 0.5
    err = ((y.cpu().double() - e)[fin].norm() / e[fin].norm().clamp_min(floor)).item()
    assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    z = x.clone()
    ops.fwht_(z, scale, perm)
    assert torch.equal(z, y)


@FUZZ
@given(st.data())
def test_fuzz_quantize_pack_dequantize(data):
    draw = data.draw
    dev = use(draw(st.sampled_from(DEVS)))
    dtype = draw(st.sampled_from(DTYPES))
    meta = draw(st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16]))
    bits = draw(st.sampled_from([1, 2, 4, 8]))
    mode = draw(st.sampled_from(["per_channel", "per_token"]))
    G = draw(st.sampled_from([1, 2, 8, 16, 32, 64, 128]))
    mult = draw(st.integers(1, 3))
    D = G * mult if mode == "per_token" else 8 * draw(st.integers(1, 24))
    T = G * mult if mode == "per_channel" else draw(st.integers(1, 40))
    if D * bits % 8:
        D = 8 * max(1, D // 8)
        if mode == "per_token" and D % G:
            return
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    x = tensor(draw, (*lead, T, D), dtype).to(dev)
    if meta == torch.float16:
        x = x.clamp(-6e4, 6e4)
    c, s, z = ops.quantize_pack(x, bits, G, mode, meta)
    rc, rs, rz = ref.quantize_pack(x.cpu(), bits, G, mode, meta)
    assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)
    assert torch.equal(c.cpu(), rc)
    y = ops.dequantize(c, s, z, bits, G, mode, dtype)
    assert torch.equal(y.cpu(), ref.dequantize(rc, rs, rz, bits, G, mode, dtype))
    assert not torch.isnan(y).any()


@FUZZ
@given(st.data())
def test_fuzz_quantize_pack_clip(data):
    """The MSE range search: every group holds one of its candidates, its codes match it, and it is the best."""
    from test_quant import _check_clip_result

    draw = data.draw
    dev = use(draw(st.sampled_from(DEVS)))
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.sampled_from([1, 2, 4, 8]))
    mode = draw(st.sampled_from(["per_channel", "per_token"]))
    G = draw(st.sampled_from([2, 8, 16, 24, 32, 64]))
    clip = draw(st.integers(0, ops.CLIP_MAX))
    mult = draw(st.integers(1, 3))
    D = G * mult if mode == "per_token" else 8 * draw(st.integers(1, 24))
    T = G * mult if mode == "per_channel" else draw(st.integers(1, 40))
    if D * bits % 8:
        return
    x = tensor(draw, (draw(st.integers(1, 3)), T, D), dtype, special=False).to(dev)
    rotate = draw(st.booleans()) and D & (D - 1) == 0 and D >= 2
    xr = ops.fwht(x) if rotate else x
    c, s, z = (ops.rotate_quantize_pack(x, bits, G, mode, None, None, None, clip) if rotate
               else ops.quantize_pack(x, bits, G, mode, None, clip))
    _check_clip_result(xr.cpu(), c.cpu(), s.cpu(), z.cpu(), bits, G, mode, dtype, max(clip, 1))


@FUZZ
@given(st.data())
def test_fuzz_rotate_quantize_pack(data):
    draw = data.draw
    dev = use(draw(st.sampled_from(DEVS)))
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.sampled_from([1, 2, 4, 8]))
    mode = draw(st.sampled_from(["per_channel", "per_token"]))
    D = 2 ** draw(st.integers(3, 9))
    G = draw(st.sampled_from([g for g in (4, 8, 16, 32, 64) if mode == "per_channel" or D % g == 0]))
    T = G * draw(st.integers(1, 3)) if mode == "per_channel" else draw(st.integers(1, 20))
    x = tensor(draw, (draw(st.integers(1, 3)), T, D), dtype, special=False).to(dev)
    perm = torch.randperm(D).to(dev) if draw(st.booleans()) else None
    sc = draw(st.sampled_from([None, 0.5]))
    fused = ops.rotate_quantize_pack(x, bits, G, mode, sc, perm)
    unfused = ops.quantize_pack(ops.fwht(x, sc, perm), bits, G, mode)
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)


@FUZZ
@given(st.data())
def test_fuzz_quant_decode_attention(data):
    draw = data.draw
    dev = use(draw(st.sampled_from(DEVS)))
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3, 4, 8]))
    Tq = draw(st.integers(1, 8))
    D = draw(st.sampled_from([32, 64, 128] + ([48, 80] if dev == "cpu" else [])))
    bk, bv = draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4, 8]))
    k_mode = draw(st.sampled_from(["per_channel", "per_token"]))
    if k_mode == "per_token":  # G = channels per key group; any quantized length
        G = draw(st.sampled_from([v for v in ((16, 32, 64) if dev == "cpu" else (32, 64)) if D % v == 0]))
        qcap = draw(st.integers(0, 150))
    else:
        G = draw(st.sampled_from([1, 8, 32, 64]))
        qcap = G * draw(st.integers(0, 4))
    VG = draw(st.sampled_from([v for v in (16, 32, 64) if D % v == 0]))
    fcap = draw(st.integers(0, 40))
    lens = []
    for _ in range(B):
        if k_mode == "per_token":
            nq = draw(st.integers(0, qcap))
        else:
            nq = G * draw(st.integers(0, qcap // G)) if qcap else 0
        ns = draw(st.integers(0, fcap))
        nr = draw(st.integers(0, fcap - ns))
        if ns + nq + nr < Tq:
            return  # invalid for this op (covered by the bad-input tests)
        lens.append((ns, nq, nr))
    meta = draw(st.sampled_from([torch.float16, torch.float32, torch.bfloat16]))
    kq = tensor(draw, (B, Hkv, qcap, D), torch.float32, special=False)
    vq = tensor(draw, (B, Hkv, qcap, D), torch.float32, special=False)
    kmeta = D // G if k_mode == "per_token" else D
    kc, ks, kz = ref.quantize_pack(kq, bk, G, k_mode, meta) if qcap else (
        torch.zeros(B, Hkv, 0, D * bk // 8, dtype=torch.uint8), torch.zeros(B, Hkv, 0, kmeta, dtype=meta),
        torch.zeros(B, Hkv, 0, kmeta, dtype=meta))
    vc, vs, vz = ref.quantize_pack(vq, bv, VG, "per_token", meta) if qcap else (
        torch.zeros(B, Hkv, 0, D * bv // 8, dtype=torch.uint8), torch.zeros(B, Hkv, 0, D // VG, dtype=meta),
        torch.zeros(B, Hkv, 0, D // VG, dtype=meta))
    kf = tensor(draw, (B, Hkv, fcap, D), dtype, special=False)
    vf = tensor(draw, (B, Hkv, fcap, D), dtype, special=False)
    q = (0.3 * tensor(draw, (B, Hkv * g, Tq, D), torch.float32, special=False)).to(dtype)
    args = [t.to(dev) for t in (q, kc, ks, kz, vc, vs, vz, kf, vf, torch.tensor(lens, dtype=torch.int32))]
    rotate = draw(st.booleans()) and D & (D - 1) == 0
    out = ops.quant_decode_attention(*args, bk, bv, G, VG, None, rotate, rotate, k_mode=k_mode)
    e = ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG, None, rotate, rotate, k_mode=k_mode)
    assert_rows_close(out, e, {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype])


@FUZZ
@given(st.data())
def test_fuzz_invalid_arguments_raise(data):
    """Random invalid combinations: each must raise ValueError naming the offending argument."""
    draw = data.draw
    case = draw(st.sampled_from(["n", "bits", "group", "mode", "dtype", "empty", "perm", "meta", "codes"]))
    T, D = draw(st.integers(1, 64)), 8 * draw(st.integers(1, 16))
    x = torch.randn(2, T, D)
    if case == "n":
        n = draw(st.integers(1, 70000).filter(lambda v: v < 2 or v > 32768 or v & (v - 1)))
        with pytest.raises(ValueError, match=r"n\)"):
            ops.fwht(torch.randn(1, n))
    elif case == "bits":
        b = draw(st.integers(-3, 16).filter(lambda v: v not in (1, 2, 4, 8)))
        with pytest.raises(ValueError, match="bits"):
            ops.quantize_pack(x, b, 1, "per_token")
    elif case == "group":
        G = draw(st.integers(1, 200).filter(lambda v: T % v))
        with pytest.raises(ValueError, match="group_size"):
            ops.quantize_pack(x, 2, G, "per_channel")
    elif case == "mode":
        m = draw(st.text(min_size=0, max_size=12).filter(lambda v: v not in ("per_channel", "per_token")))
        with pytest.raises(ValueError, match="mode"):
            ops.quantize_pack(x, 2, 1, m)
    elif case == "dtype":
        dt = draw(st.sampled_from([torch.float64, torch.int32, torch.int8, torch.bool, torch.complex64]))
        with pytest.raises(ValueError, match="x must be float32"):
            ops.quantize_pack(torch.zeros(2, T, D, dtype=dt), 2, 1, "per_token")
    elif case == "empty":
        with pytest.raises(ValueError, match="empty"):
            ops.fwht(torch.randn(0, 64))
    elif case == "perm":
        p = torch.randint(-3, 70, (64,))
        if sorted(p.tolist()) == list(range(64)):
            return
        with pytest.raises(ValueError, match="perm"):
            ops.fwht(torch.randn(2, 64), None, p)
    elif case == "meta":
        with pytest.raises(ValueError, match="meta_dtype"):
            ops.quantize_pack(x, 2, 1, "per_token", draw(st.sampled_from([torch.float64, torch.int8])))
    elif case == "codes":
        c, s, z = ops.quantize_pack(x, 2, 1, "per_token")
        with pytest.raises(ValueError, match="scale must have shape|zero must have shape"):
            ops.dequantize(c, s[..., :-1] if s.shape[-1] > 1 else s[:1, :0], z, 2, 1, "per_token", torch.float32)


def test_nan_and_inf_propagate_like_the_reference():
    x = torch.randn(2, 64, 64)
    x[0, 3, 5] = float("nan")
    x[1, 40, 7] = float("inf")
    for mode in ("per_channel", "per_token"):
        c, s, z = ops.quantize_pack(x, 2, 32, mode)
        rc, rs, rz = ref.quantize_pack(x, 2, 32, mode)
        assert torch.equal(c, rc)
        torch.testing.assert_close(s, rs, equal_nan=True)
        torch.testing.assert_close(z, rz, equal_nan=True)
        y = ops.dequantize(c, s, z, 2, 32, mode, torch.float32)
        assert torch.isnan(y[0, 3, 5])  # the NaN's group is NaN
        torch.testing.assert_close(y, ref.dequantize(rc, rs, rz, 2, 32, mode, torch.float32), equal_nan=True)
        # groups without NaN/Inf are untouched by them
        if mode == "per_token":
            assert torch.isfinite(y[0, 4]).all()
    y = ops.fwht(x)
    assert torch.isnan(y[0, 3]).all() and torch.isfinite(y[0, 4]).all()


def test_fp16_score_overflow_is_avoided():
    """fp16 queries/keys whose products overflow fp16 (scores accumulated in fp32, never in half)."""
    D = 64
    c = kvengine.QuantizedKVCache(1, D, bits_k=8, bits_v=8, residual=8, sinks=0, rotate=False, dtype=torch.float16)
    k = torch.full((1, 1, 64, D), 200.0, dtype=torch.float16)
    k[..., ::2] = -200.0
    v = torch.randn(1, 1, 64, D).half()
    c.append(k, v)
    q = torch.full((1, 2, 1, D), 300.0, dtype=torch.float16)  # q·k = ±3.8e6 >> 65504
    out = c.attend(q)
    assert torch.isfinite(out).all()


# ---- 1-bit QK attention and hash retrieval ---------------------------------------------------------------------------
@FUZZ
@given(st.data())
def test_fuzz_sign_pack_and_binary_attention(data):
    draw = data.draw
    dev = use(draw(st.sampled_from(DEVS)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([32, 64, 128]))
    Lq, Lk = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    causal = draw(st.booleans()) and Lq <= Lk
    center = draw(st.booleans())
    q = tensor(draw, (B, Hkv * g, Lq, D), dtype, special=False).to(dev)
    k = tensor(draw, (B, Hkv, Lk, D), dtype, special=False).to(dev)
    v = tensor(draw, (B, Hkv, Lk, D), dtype, special=False).to(dev)
    bits, sc = ops.sign_pack(k, center)
    rb, rs = ref.sign_pack(k.cpu(), center)
    assert torch.equal(bits.cpu(), rb)
    torch.testing.assert_close(sc.cpu(), rs, rtol=1e-5, atol=1e-6)
    rel = None
    if draw(st.booleans()):
        R = max(Lq, Lk)
        rel = (0.5 * torch.randn(Hkv * g, 2 * R - 1)).to(dev)
    out = ops.binary_attention(q, k, v, None, rel, causal, center)
    e = ref.binary_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), None,
                             None if rel is None else rel.cpu(), causal, center)
    assert_rows_close(out.float(), e, 1e-4 if dtype == torch.float32 else 2e-2)


@FUZZ
@given(st.data())
def test_fuzz_hash_encode_topk_sparse_attention(data):
    draw = data.draw
    dev = use(draw(st.sampled_from(DEVS)))
    B, Hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([32, 64]))
    nbits = draw(st.sampled_from([32, 64, 128]))
    N = draw(st.integers(1, 300))
    k_top = draw(st.integers(1, N))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, Hkv, N, D, generator=gen)
    qs = torch.randn(B, Hkv * g, 1, D, generator=gen)
    w1 = torch.randn(D, nbits, generator=gen) / D**0.5
    kc = ops.hash_encode(keys.to(dev), w1.to(dev))
    qc = ops.hash_encode(qs.to(dev), w1.to(dev))
    # bit-exact where the projection is not within rounding of zero
    proj = ref.hash_project(keys, w1)
    safe = (proj.abs() > 1e-4).all(-1)
    rk = ref.hash_encode(keys, w1)
    assert torch.equal(kc.cpu()[safe], rk[safe])
    idx, sco = ops.hamming_topk(qc, kc, k_top)
    ridx, rsco = ref.hamming_topk(qc.cpu(), kc.cpu(), k_top)
    assert torch.equal(idx.cpu().long(), ridx.long()) and torch.equal(sco.cpu().long(), rsco.long())
    v = torch.randn(B, Hkv, N, D, generator=gen)
    out = ops.sparse_decode_attention(qs.to(dev), keys.to(dev), v.to(dev), idx)
    e = ref.sparse_decode_attention(qs, keys, v, idx.cpu())
    assert_rows_close(out, e, 1e-4)
