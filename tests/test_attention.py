import math

"""quant_decode_attention vs the reference, built directly from random packed segments (incl. varlen)."""
import pytest
import torch

import kvengine
from kvengine import ops
from kvengine import reference as ref

from conftest import DEVICES, GPU_DEVICES, HAS_CUDA, assert_rows_close, outlier_randn

# fp32 kernels vs the float64-accumulating reference on heavy-tailed data (logits in the hundreds): the CPU kernel
# itself reached 1.08e-4 on one seed (an emulation of the CUDA kernel on the CPU: 7.2e-5), so 1e-4 flaked; a real
# indexing or unpacking bug is >= 1e-2
FP32 = 2e-4


def fp32_tol(device, args, bk, bv, G, VG, softmax_scale=None, rotate_k=False, k_perm=None, k_mode="per_channel"):
    """FP32, or more where fp32 arithmetic itself cannot reach it on these heavy-tailed inputs (logits up to ~10^5):
    an output row's relative error follows the absolute error of its logits.  The CPU kernel dequantizes
    (k̂ = code·s + z) and takes q·k̂, whose error is a few ulp of |q·k̂|: 4 units of 2^-24·max|logit| (worst measured:
    1.5 units over 1500 draws of the per-token cases).  The CUDA kernel folds the scale into q, s·(q·code) + z·Σq,
    which cancels against large zero points: 3 units of 2^-24·max_t Σ_d |q_d|(|k̂_td| + |z_td|) (worst measured in
    the emulator: 1.0 unit over 600 draws of each per-token case; a fixed 2e-4 failed ~1 in 100).  The emulator runs
    the CUDA kernel, so it gets the folded bound too (until session 10 it got the CPU's, `str(EMU)` being "cpu": one
    draw in ~200 of a per-token case failed at 1.9× that tolerance).

    Per output row, times the row's cancellation factor A = ‖Σ_j p_j |v_j|‖ / ‖Σ_j p_j v_j‖ (≥ 1): when heavy-tailed
    values nearly cancel, the same absolute error is a larger part of a small output (CI, session 26: a D=16 row with
    A = 153 and logits up to 118 was off by 6e-4, against a floor of 2e-4).  Returns a tensor [B, Hq, Tq]."""
    q = args[0].detach().cpu().double()
    B, Hq, Tq, D = q.shape
    Hkv = args[1].shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if rotate_k:
        q = ref.fwht(q, None, None if k_perm is None else k_perm.cpu())
    a = [t.cpu() for t in args[1:10]]
    zero_only = [a[0] * 0, a[1] * 0, a[2], *a[3:6], a[6] * 0, *a[7:]]  # dequantizes to z (0 for fp tokens)
    folded = device != "cpu"  # the CUDA kernel, on a GPU or in the emulator (EMU compares unequal to "cpu")
    tol = torch.full((B, Hq, Tq), FP32, dtype=torch.float64)
    for b in range(B):
        K, V = ref.gather_kv(*a, bk, bv, G, VG, b, k_mode=k_mode)
        if not K.shape[1]:
            continue
        K, V = K.double().repeat_interleave(Hq // Hkv, 0), V.double().repeat_interleave(Hq // Hkv, 0)
        if folded:
            Z, _ = ref.gather_kv(*zero_only, bk, bv, G, VG, b, k_mode=k_mode)
            mag = q[b].abs() @ (K.abs() + Z.double().abs().repeat_interleave(Hq // Hkv, 0)).transpose(-1, -2)
        else:
            mag = (q[b] @ K.transpose(-1, -2)).abs()
        m = mag.amax(-1) * scale  # [Hq, Tq]
        p = torch.softmax(q[b] @ K.transpose(-1, -2) * scale, -1)
        cancel = ((p @ V.abs()).norm(dim=-1) / (p @ V).norm(dim=-1).clamp_min(1e-30)).clamp_min(1.0)
        tol[b] = (3.0 if folded else 4.0) * 2.0**-24 * m
        tol[b] = tol[b].clamp_min(FP32) * cancel
    return tol


def make_inputs(B, Hkv, g, Tq, D, bits_k, bits_v, G, VG, lens, qcap, fcap, dtype, meta_dtype, gen, device,
                k_mode="per_channel"):
    """Random cache segments of the given capacities; lens [B, 3] = (n_sink, n_quant, n_res).  Keys per-channel in
    groups of G tokens, or (``k_mode="per_token"``) per token in groups of G channels."""
    kq = outlier_randn(B, Hkv, qcap, D, generator=gen)
    vq = outlier_randn(B, Hkv, qcap, D, generator=gen)
    kc, ks, kz = ref.quantize_pack(kq, bits_k, G, k_mode, meta_dtype)
    vc, vs, vz = ref.quantize_pack(vq, bits_v, VG, "per_token", meta_dtype)
    k_fp = outlier_randn(B, Hkv, fcap, D, generator=gen).to(dtype)
    v_fp = outlier_randn(B, Hkv, fcap, D, generator=gen).to(dtype)
    q = outlier_randn(B, Hkv * g, Tq, D, generator=gen).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    args = [q, kc, ks, kz, vc, vs, vz, k_fp, v_fp, lens_t]
    return [a.to(device) for a in args]


CASES = [
    # B, Hkv, g, Tq, D, bits_k, bits_v, G, VG, lens, qcap, fcap
    (1, 2, 1, 1, 64, 2, 2, 32, 32, [(4, 64, 20)], 96, 40),
    (2, 3, 3, 1, 64, 2, 4, 32, 32, [(4, 128, 7), (0, 32, 1)], 128, 24),        # varlen, GQA 3
    (1, 1, 8, 4, 128, 4, 2, 32, 64, [(4, 96, 3)], 128, 16),                     # MQA 8, Tq=4 crossing into quant
    (2, 2, 4, 8, 128, 4, 4, 64, 32, [(2, 128, 6), (4, 0, 9)], 192, 16),         # Tq=8, empty quantized part
    (1, 2, 1, 2, 256, 2, 2, 16, 128, [(3, 48, 0)], 64, 8),                       # D=256, no residual
    (1, 2, 2, 1, 128, 1, 8, 32, 16, [(1, 64, 5)], 64, 8),                        # 1-bit K, 8-bit V
    (3, 1, 1, 3, 32, 2, 2, 32, 16, [(3, 0, 0), (1, 32, 2), (0, 64, 31)], 64, 40),  # tiny heads, sinks only
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(device, case, dtype, gen):
    B, Hkv, g, Tq, D, bk, bv, G, VG, lens, qcap, fcap = case
    args = make_inputs(B, Hkv, g, Tq, D, bk, bv, G, VG, lens, qcap, fcap, dtype, torch.float16, gen, device)
    out = ops.quant_decode_attention(*args, bk, bv, G, VG)
    expect = ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_rows_close(out, expect if dtype == torch.float32 else
                      ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG).float(),
                      {torch.float32: fp32_tol(device, args, bk, bv, G, VG), torch.bfloat16: 2e-2,
                       torch.float16: 4e-3}[dtype])


# per-token keys: G is the key channel group (a multiple of 32 on CUDA, 16 on CPU); quantized lengths need not be
# multiples of anything
CASES_KTOK = [
    # B, Hkv, g, Tq, D, bits_k, bits_v, G, VG, lens, qcap, fcap
    (2, 2, 3, 2, 64, 2, 2, 32, 32, [(4, 70, 5), (1, 33, 0)], 96, 16),          # varlen, GQA 3, odd lengths
    (1, 1, 8, 4, 128, 4, 2, 64, 64, [(0, 129, 3)], 160, 8),                     # MQA, Tq=4, tile boundary + 1
    (1, 2, 1, 3, 256, 1, 8, 256, 16, [(2, 40, 3)], 64, 8),                      # one group per token, D=256
    (2, 1, 2, 1, 128, 8, 4, 32, 32, [(1, 300, 2), (3, 7, 9)], 320, 16),         # 8-bit K, several tiles
    (1, 2, 4, 1, 32, 2, 4, 32, 16, [(0, 65, 1)], 96, 4),                        # tiny heads
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES_KTOK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_keys_match_reference(device, case, dtype, gen):
    B, Hkv, g, Tq, D, bk, bv, G, VG, lens, qcap, fcap = case
    args = make_inputs(B, Hkv, g, Tq, D, bk, bv, G, VG, lens, qcap, fcap, dtype, torch.float16, gen, device,
                       "per_token")
    out = ops.quant_decode_attention(*args, bk, bv, G, VG, k_mode="per_token")
    expect = ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG, k_mode="per_token").float()
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_rows_close(out, expect, {torch.float32: fp32_tol(device, args, bk, bv, G, VG, k_mode="per_token"),
                                    torch.bfloat16: 2e-2}[dtype])
    # with rotation (q rotated in, out rotated back)
    if dtype == torch.float32:
        o2 = ops.quant_decode_attention(*args, bk, bv, G, VG, 0.3, True, True, k_mode="per_token")
        e2 = ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG, 0.3, True, True, k_mode="per_token")
        assert_rows_close(o2, e2, fp32_tol(device, args, bk, bv, G, VG, 0.3, True, k_mode="per_token"))


@pytest.mark.parametrize("D,bk,bv", [(16, 4, 2), (48, 2, 8), (80, 1, 4), (96, 8, 1)])
def test_cpu_head_dims_off_the_fast_paths(D, bk, bv, gen):
    """Head dims the CPU kernel has no compile-time specialization for (D/16 not in {2, 4, 8, 16}), and D=16:
    every bit width, GQA 3, varlen with a partial last block."""
    args = make_inputs(2, 2, 3, 2, D, bk, bv, 16, 16, [(3, 48, 5), (0, 16, 1)], 64, 8, torch.float32,
                       torch.float16, gen, "cpu")
    assert_rows_close(ops.quant_decode_attention(*args, bk, bv, 16, 16),
                      ref.quant_decode_attention(*args, bk, bv, 16, 16), fp32_tol("cpu", args, bk, bv, 16, 16))


def test_per_token_keys_group16_cpu(gen):
    args = make_inputs(2, 1, 2, 2, 48, 2, 2, 16, 16, [(2, 37, 3), (0, 5, 2)], 40, 8, torch.float32, torch.float16,
                       gen, "cpu", "per_token")
    assert_rows_close(ops.quant_decode_attention(*args, 2, 2, 16, 16, k_mode="per_token"),
                      ref.quant_decode_attention(*args, 2, 2, 16, 16, k_mode="per_token"),
                      fp32_tol("cpu", args, 2, 2, 16, 16, k_mode="per_token"))


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_and_perms(device, gen):
    B, Hkv, g, Tq, D = 2, 2, 2, 2, 64
    args = make_inputs(B, Hkv, g, Tq, D, 2, 2, 32, 32, [(4, 64, 10), (2, 32, 3)], 64, 16, torch.float32,
                       torch.float32, gen, device)
    kp, vp = torch.randperm(D, generator=gen).to(device), torch.randperm(D, generator=gen).to(device)
    for rk, rv, kpp, vpp in ((True, False, None, None), (False, True, None, vp), (True, True, kp, vp)):
        out = ops.quant_decode_attention(*args, 2, 2, 32, 32, 0.2, rk, rv, kpp, vpp)
        e = ref.quant_decode_attention(*[a.cpu() for a in args], 2, 2, 32, 32, 0.2, rk, rv,
                                       None if kpp is None else kpp.cpu(), None if vpp is None else vpp.cpu())
        assert_rows_close(out, e, fp32_tol(device, args, 2, 2, 32, 32, 0.2, rk, kpp))


def test_opcheck(gen):
    args = make_inputs(2, 2, 2, 2, 64, 2, 4, 32, 32, [(4, 64, 10), (1, 32, 3)], 64, 16, torch.float32,
                       torch.float16, gen, "cpu")
    torch.library.opcheck(torch.ops.kvengine.quant_decode_attention.default,
                          (*args, 2, 4, 32, 32, None, False, False, None, None))
    torch.library.opcheck(torch.ops.kvengine.quant_decode_attention.default,
                          (*args, 2, 4, 32, 32, 0.1, True, True, None, torch.randperm(64)))
    args = make_inputs(2, 2, 2, 2, 64, 2, 4, 32, 32, [(4, 61, 10), (1, 3, 3)], 64, 16, torch.float32,
                       torch.float16, gen, "cpu", "per_token")
    torch.library.opcheck(torch.ops.kvengine.quant_decode_attention.default,
                          (*args, 2, 4, 32, 32, None, False, False, None, None, "per_token"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_opcheck_cuda_and_graph_capture(gen):
    args = make_inputs(2, 2, 4, 1, 128, 2, 2, 32, 32, [(4, 256, 10), (1, 128, 3)], 256, 160, torch.bfloat16,
                       torch.bfloat16, gen, "cuda")
    torch.library.opcheck(torch.ops.kvengine.quant_decode_attention.default,
                          (*args, 2, 2, 32, 32, None, False, False, None, None))
    # capturable in a CUDA graph: replay after changing lens on the device gives the new answer
    static = ops.quant_decode_attention(*args, 2, 2, 32, 32)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = ops.quant_decode_attention(*args, 2, 2, 32, 32)
    args[-1].copy_(torch.tensor([[4, 224, 9], [0, 96, 2]], dtype=torch.int32))
    graph.replay()
    expect = ref.quant_decode_attention(*[a.cpu() for a in args], 2, 2, 32, 32)
    assert_rows_close(out, expect, 2e-2)
    assert not torch.equal(out, static)


def test_bad_inputs(gen):
    args = make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 64, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu")
    q, kc, ks, kz, vc, vs, vz, kf, vf, lens = args

    def call(*a, bk=2, bv=2, G=32, VG=32, **kw):
        return ops.quant_decode_attention(*a, bk, bv, G, VG, **kw)

    with pytest.raises(ValueError, match=r"query head count Hq \(3\) must be a multiple of the KV head count Hkv \(2\)"):
        call(q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="head_dim D .* multiple of 16"):
        call(q[..., :40], *args[1:])
    with pytest.raises(ValueError, match=r"k_scale must have shape"):
        call(q, kc, ks[:, :, :1], kz, vc, vs, vz, kf, vf, lens)
    with pytest.raises(ValueError, match=r"v_fp must be"):
        call(q, kc, ks, kz, vc, vs, vz, kf, vf.double(), lens)
    with pytest.raises(ValueError, match=r"lens\[0\] = \(4, 96, 10\) exceeds the capacities"):
        call(q, kc, ks, kz, vc, vs, vz, kf, vf, torch.tensor([[4, 96, 10]], dtype=torch.int32))
    with pytest.raises(ValueError, match="fewer than the 2 new query tokens"):
        call(torch.cat([q, q], 2), kc, ks, kz, vc, vs, vz, kf, vf, torch.tensor([[1, 0, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"Tq .* must be in \[1, 8\]"):
        call(q.expand(-1, -1, 9, -1), *args[1:])
    with pytest.raises(ValueError, match="bits must be 1, 2, 4 or 8"):
        call(*args, bk=3)
    with pytest.raises(ValueError, match="k_group .* must be >= 1 and divide"):
        call(*args, G=48)
    with pytest.raises(ValueError, match="v_group .* multiple of 16"):
        call(*args, VG=24)
    with pytest.raises(ValueError, match="lens must be Int"):
        call(q, kc, ks, kz, vc, vs, vz, kf, vf, lens.long())
    with pytest.raises(ValueError, match="k_perm given but rotate_k is false"):
        call(*args, k_perm=torch.randperm(64))
    with pytest.raises(ValueError, match="k_mode must be 'per_channel' or 'per_token', got 'token'"):
        call(*args, k_mode="token")
    with pytest.raises(ValueError, match=r"k_scale must have shape \[1, 2, 64, 2\]"):  # per-channel metadata
        call(*args, k_mode="per_token")
    t = make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 60, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu",
                    "per_token")
    with pytest.raises(ValueError, match=r"per-token keys k_group \(24\) must be a multiple of 16 that divides"):
        call(*t, G=24, k_mode="per_token")
    with pytest.raises(ValueError, match=r"per-token keys k_group \(48\) must be a multiple of 16 that divides"):
        call(*t, G=48, k_mode="per_token")
    with pytest.raises(ValueError, match="must be a power of two"):
        qq = torch.randn(1, 4, 1, 48)
        a2 = make_inputs(1, 2, 2, 1, 48, 2, 2, 32, 16, [(4, 64, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu")
        ops.quant_decode_attention(*a2, 2, 2, 32, 16, None, True, False)


def test_size_limits(gen):
    """Capacities / row counts past the kernels' 32-bit positions are rejected before anything is allocated."""
    args = make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 64, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu")
    q, kc, ks, kz, vc, vs, vz, kf, vf, lens = args
    big_kc = kc[:, :, :1].expand(1, 2, 2**31, kc.shape[-1])  # q_cap = 2^31, no memory behind it
    with pytest.raises(ValueError, match=r"quantized capacity \(dim 2 of k_codes, 2147483648\) plus the "
                                         r"full-precision capacity \(dim 2 of k_fp, 16\) must be < 2\^31"):
        ops.quant_decode_attention(q, big_kc, ks, kz, vc, vs, vz, kf, vf, lens, 2, 2, 32, 32)
    big_kf = kf[:, :, :1].expand(1, 2, 2**31 - 64, 64)  # 64 + (2^31 - 64) = 2^31
    with pytest.raises(ValueError, match=r"full-precision capacity \(dim 2 of k_fp, 2147483584\) must be < 2\^31"):
        ops.quant_decode_attention(q, kc, ks, kz, vc, vs, vz, big_kf, vf, lens, 2, 2, 32, 32)
    big_q = q[:, :1].expand(1, 2**31, 1, 64)  # Hq = 2^31 (a multiple of Hkv = 2)
    with pytest.raises(ValueError, match=r"B·Hq·Tq \(1·2147483648·1 query rows\) must be < 2\^31"):
        ops.quant_decode_attention(big_q, *args[1:], 2, 2, 32, 32)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_cuda_alignment_and_lens_clamp(device, gen):
    args = make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 64, 10)], 64, 16, torch.float32, torch.float16, gen, device)
    q, kc, ks, kz, vc, vs, vz, kf, vf, lens = args
    # a contiguous view one byte into its storage: rejected (the kernel's 16-byte loads need an aligned start)
    flat = torch.zeros(kc.numel() + 1, dtype=torch.uint8, device=device)
    kc_off = flat[1:].view(kc.shape)
    kc_off.copy_(kc)
    with pytest.raises(ValueError, match="on CUDA k_codes must start at a 16-byte aligned address"):
        ops.quant_decode_attention(q, kc_off, *args[2:], 2, 2, 32, 32)
    # lens past the capacities are not checked on CUDA (no host sync) but clamped on the device: never out of bounds
    bad = torch.tensor([[20, 200, 30]], dtype=torch.int32, device=device)  # capacities: quantized 64, fp 16
    out = ops.quant_decode_attention(q, kc, ks, kz, vc, vs, vz, kf, vf, bad, 2, 2, 32, 32)
    clamped = torch.tensor([[16, 64, 0]], dtype=torch.int32)
    expect = ref.quant_decode_attention(*[a.cpu() for a in args[:-1]], clamped, 2, 2, 32, 32)
    assert_rows_close(out, expect, fp32_tol(device, [*args[:-1], clamped], 2, 2, 32, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_cuda_per_token_keys_group16_rejected(gen):
    t = make_inputs(1, 2, 2, 1, 64, 2, 2, 16, 32, [(4, 60, 10)], 64, 16, torch.float32, torch.float16, gen, "cuda",
                    "per_token")
    with pytest.raises(ValueError, match="on CUDA per-token keys need k_group a multiple of 32"):
        ops.quant_decode_attention(*t, 2, 2, 16, 32, k_mode="per_token")
    # the CPU takes groups of 16
    c = [a.cpu() for a in t]
    assert_rows_close(ops.quant_decode_attention(*c, 2, 2, 16, 32, k_mode="per_token"),
                      ref.quant_decode_attention(*c, 2, 2, 16, 32, k_mode="per_token"),
                      fp32_tol("cpu", c, 2, 2, 16, 32, k_mode="per_token"))


# ---- sparse attention over the packed cache (retrieval: indices of logical positions) ------------------------------
SPARSE_CASES = [
    # B, Hkv, g, D, bits_k, bits_v, G, VG, lens, qcap, fcap, n_idx, k_mode
    (2, 2, 3, 64, 2, 4, 32, 32, [(4, 64, 10), (2, 32, 3)], 64, 16, 50, "per_channel"),
    (1, 1, 8, 128, 4, 2, 32, 64, [(4, 96, 3)], 128, 16, 300, "per_token"),      # MQA, several chunks
    (2, 3, 1, 32, 2, 2, 32, 16, [(0, 128, 31), (3, 0, 9)], 128, 40, 7, "per_channel"),  # no quantized part in b=1
    (1, 2, 2, 256, 1, 8, 64, 128, [(2, 70, 5)], 128, 8, 33, "per_token"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SPARSE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_sparse_indices_match_reference(device, case, dtype, idx_dtype, gen):
    B, Hkv, g, D, bk, bv, G, VG, lens, qcap, fcap, n, km = case
    args = make_inputs(B, Hkv, g, 1, D, bk, bv, G, VG, lens, qcap, fcap, dtype, torch.float16, gen, device, km)
    N = max(sum(l) for l in lens)
    idx = torch.randint(-2, N + 3, (B, Hkv, n), generator=gen)  # -1/-2 padding and positions past N: skipped
    idx[0, 0, : n // 2] = idx[0, 0, 0]  # duplicates count twice
    idx[-1, -1] = -1  # a KV head with nothing selected: its query rows are 0
    idx = idx.to(device, idx_dtype)
    out = ops.quant_decode_attention(*args, bk, bv, G, VG, k_mode=km, indices=idx)
    expect = ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG, k_mode=km, indices=idx.cpu())
    assert out.shape == args[0].shape and out.dtype == dtype
    assert (out[-1, -g:] == 0).all()
    assert_rows_close(out, expect.float(), {torch.float32: fp32_tol(device, args, bk, bv, G, VG, k_mode=km),
                                            torch.bfloat16: 2e-2}[dtype])
    if dtype == torch.float32 and D & (D - 1) == 0:  # rotated cache: q rotated in, output rotated back
        o2 = ops.quant_decode_attention(*args, bk, bv, G, VG, 0.2, True, True, k_mode=km, indices=idx)
        e2 = ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG, 0.2, True, True, k_mode=km,
                                        indices=idx.cpu())
        assert_rows_close(o2, e2, fp32_tol(device, args, bk, bv, G, VG, 0.2, True, k_mode=km))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_every_position_equals_dense(device, gen):
    args = make_inputs(2, 2, 4, 1, 64, 2, 2, 32, 32, [(4, 64, 10), (1, 32, 40)], 64, 48, torch.float32,
                       torch.float16, gen, device)
    idx = torch.randperm(78, generator=gen).expand(2, 2, 78).contiguous().to(device)
    # on CUDA the dense kernel folds the key scale into q (Σ (q·s·2^-pos)(code·2^pos) + Σ q·z) and the sparse one
    # dequantizes (Σ q·(code·s + z)): different roundings, up to 9.4e-5 apart in an emulation on these inputs
    assert_rows_close(ops.quant_decode_attention(*args, 2, 2, 32, 32, indices=idx),
                      ops.quant_decode_attention(*args, 2, 2, 32, 32), 1e-5 if device == "cpu" else FP32)
    empty = torch.zeros(2, 2, 0, dtype=torch.int64, device=device)
    assert (ops.quant_decode_attention(*args, 2, 2, 32, 32, indices=empty) == 0).all()
    # int64 positions past int32 are skipped, not wrapped onto valid positions
    big = torch.full((2, 2, 3), 2**32 + 5, dtype=torch.int64, device=device)
    big[..., 0] = 7
    one = torch.full((2, 2, 1), 7, dtype=torch.int64, device=device)
    assert_rows_close(ops.quant_decode_attention(*args, 2, 2, 32, 32, indices=big),
                      ops.quant_decode_attention(*args, 2, 2, 32, 32, indices=one), 1e-6)


def test_sparse_bad_inputs_and_opcheck(gen):
    args = make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 64, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu")
    idx = torch.randint(0, 78, (1, 2, 20), generator=gen)
    with pytest.raises(ValueError, match=r"indices must be \[B=1, Hkv=2, n\]"):
        ops.quant_decode_attention(*args, 2, 2, 32, 32, indices=idx[:, :1])
    with pytest.raises(ValueError, match="indices must be int32 or int64"):
        ops.quant_decode_attention(*args, 2, 2, 32, 32, indices=idx.float())
    q2 = torch.cat([args[0], args[0]], 2)
    with pytest.raises(ValueError, match=r"indices \(sparse attention\) need Tq = 1"):
        ops.quant_decode_attention(q2, *args[1:], 2, 2, 32, 32, indices=idx)
    torch.library.opcheck(torch.ops.kvengine.quant_decode_attention.default,
                          (*args, 2, 2, 32, 32, None, False, False, None, None, "per_channel", idx))


# ---- int8 QK (qk_int8): the packed keys scored with int8 queries on the CPU ----------------------------------------
CASES_I8_CPU = [  # head sizes / groups only the CPU kernel takes
    # B, Hkv, g, Tq, D, bits_k, bits_v, G, VG, lens, qcap, fcap
    (1, 2, 3, 2, 48, 4, 2, 16, 16, [(2, 48, 5)], 64, 8),           # D=48: the scalar plane order, GQA 3
    (2, 1, 2, 1, 80, 1, 4, 16, 16, [(3, 48, 5), (0, 16, 1)], 64, 8),  # D=80, 1-bit keys, varlen
    (1, 2, 4, 1, 16, 2, 2, 32, 16, [(0, 96, 0)], 96, 4),            # D=16: one vector, quantized tokens only
    (1, 1, 4, 1, 128, 4, 4, 32, 32, [(4, 1024, 37)], 1024, 64),     # many groups and blocks
    (1, 2, 3, 1, 64, 1, 2, 32, 32, [(4, 96, 5)], 96, 16),           # D=64 1-bit keys: 8-byte planes (byte tail)
    (2, 2, 2, 2, 64, 4, 4, 32, 16, [(1, 64, 3), (4, 33, 2)], 64, 8),  # D=64 4-bit keys: 32-byte planes, varlen
]


@pytest.mark.parametrize("device,case", [pytest.param(d.values[0], c, marks=d.marks, id=f"{d.id}-{i}")
                                         for d in DEVICES for i, c in enumerate(CASES)]
                         + [pytest.param("cpu", c, id=f"cpu-odd{i}") for i, c in enumerate(CASES_I8_CPU)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_int8_matches_reference(device, case, dtype, gen):
    """On the CPU the int8 path matches reference.int8_qk_scores (same fp32 rounding of q8, exact integer dots);
    8-bit keys stay exact.  CUDA ignores the flag: the exact reference."""
    B, Hkv, g, Tq, D, bk, bv, G, VG, lens, qcap, fcap = case
    args = make_inputs(B, Hkv, g, Tq, D, bk, bv, G, VG, lens, qcap, fcap, dtype, torch.float16, gen, device)
    out = ops.quant_decode_attention(*args, bk, bv, G, VG, qk_int8=True)
    expect = ref.quant_decode_attention(*[a.cpu() for a in args], bk, bv, G, VG, qk_int8=device == "cpu")
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_rows_close(out, expect.float(), {torch.float32: fp32_tol(device, args, bk, bv, G, VG),
                                            torch.bfloat16: 2e-2}[dtype])


def test_qk_int8_reference_is_not_the_exact_one(gen):
    """On a cache of packed tokens only (no sinks or recent tokens to hide them; Gaussian data, logits of a few
    units) the int8 reference differs from the exact one by far more than fp32 noise (the smallest of 40 seeds:
    2.0e-2 against 2e-4), so the kernel matching it took the int8 path, and the exact path does not match it."""
    k, v = torch.randn(1, 2, 256, 128, generator=gen) * 2, torch.randn(1, 2, 256, 128, generator=gen)
    kc, ks, kz = ref.quantize_pack(k, 2, 32, "per_channel", torch.float16)
    vc, vs, vz = ref.quantize_pack(v, 2, 32, "per_token", torch.float16)
    fp = torch.zeros(1, 2, 16, 128)
    args = [torch.randn(1, 8, 1, 128, generator=gen) * 2, kc, ks, kz, vc, vs, vz, fp, fp,
            torch.tensor([[0, 256, 0]], dtype=torch.int32)]
    e8 = ref.quant_decode_attention(*args, 2, 2, 32, 32, qk_int8=True)
    ex = ref.quant_decode_attention(*args, 2, 2, 32, 32)
    rel = ((e8 - ex).norm(dim=-1) / ex.norm(dim=-1)).max().item()
    assert rel > 20 * FP32, rel
    assert_rows_close(ops.quant_decode_attention(*args, 2, 2, 32, 32, qk_int8=True), e8, FP32)
    with pytest.raises(AssertionError):
        assert_rows_close(ops.quant_decode_attention(*args, 2, 2, 32, 32), e8, FP32)


def test_qk_int8_other_cases_stay_exact(gen):
    """Per-token keys, 8-bit keys, a sparse selection and a cache without packed tokens: bit for bit the exact
    path."""
    def same(args, *rest, **kw):
        a = ops.quant_decode_attention(*args, *rest, qk_int8=True, **kw)
        b = ops.quant_decode_attention(*args, *rest, **kw)
        assert torch.equal(a, b)

    t = make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 60, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu",
                    "per_token")
    same(t, 2, 2, 32, 32, k_mode="per_token")
    same(make_inputs(1, 2, 2, 1, 64, 8, 2, 32, 32, [(4, 64, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu"),
         8, 2, 32, 32)
    args = make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 64, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu")
    same(args, 2, 2, 32, 32, indices=torch.randint(0, 78, (1, 2, 20), generator=gen))
    same(make_inputs(1, 2, 2, 1, 64, 2, 2, 32, 32, [(4, 0, 10)], 64, 16, torch.float32, torch.float16, gen, "cpu"),
         2, 2, 32, 32)


def test_qk_int8_rotation(gen):
    """With rotate_k the op rotates q first (in fp32, with k_perm): the same as passing fwht(q[..., perm])."""
    args = make_inputs(2, 2, 2, 2, 64, 2, 4, 32, 32, [(4, 96, 10), (1, 32, 3)], 96, 16, torch.float32,
                       torch.float16, gen, "cpu")
    kp = torch.randperm(64, generator=gen)
    out = ops.quant_decode_attention(*args, 2, 4, 32, 32, 0.3, True, False, kp, qk_int8=True)
    pre = ops.quant_decode_attention(ops.fwht(args[0], None, kp), *args[1:], 2, 4, 32, 32, 0.3, qk_int8=True)
    assert torch.equal(out, pre)


@pytest.mark.parametrize("bits,rotate,bound", [(2, True, 0.08), (2, False, 0.25), (4, True, 0.45)])
def test_qk_int8_error_is_small_against_the_quantization(bits, rotate, bound, gen):
    """The error int8 queries add, against the error of the quantized cache itself (both against fp32 attention
    over the unquantized keys and values).  Measured (4 seeds): INT2 rotated 1.7–1.9 %, INT2 unrotated 3–7 %,
    INT4 rotated 5–19 %.  Keys with outlier channels, fresh per run."""
    from kvengine.cache import QuantizedKVCache

    H, g, D, N = 2, 4, 128, 700
    k = torch.randn(1, H, N, D, generator=gen) * (1 + 8 * (torch.rand(D, generator=gen) < 0.05))
    v = torch.randn(1, H, N, D, generator=gen)
    q = torch.randn(1, H * g, 1, D, generator=gen) * (1 + 4 * (torch.rand(D, generator=gen) < 0.05))
    c = QuantizedKVCache(H, D, bits_k=bits, bits_v=bits, rotate=rotate)
    c.append(k, v)
    exact = c.attend(q)
    c.qk_int8 = True
    i8 = c.attend(q)
    fp = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    extra, quant = (i8 - exact).norm().item(), (exact - fp).norm().item()
    assert 0 < extra < bound * quant, (extra, quant)


def test_qk_int8_opcheck_and_cache_flag(gen):
    args = make_inputs(2, 2, 2, 2, 64, 2, 4, 32, 32, [(4, 64, 10), (1, 32, 3)], 64, 16, torch.float32,
                       torch.float16, gen, "cpu")
    torch.library.opcheck(torch.ops.kvengine.quant_decode_attention.default,
                          (*args, 2, 4, 32, 32, None, False, False, None, None, "per_channel", None, True))
    from kvengine.cache import QuantizedKVCache

    with pytest.raises(ValueError, match="qk_int8 must be a bool"):
        QuantizedKVCache(2, 64, qk_int8="yes")
    c = QuantizedKVCache(2, 64, qk_int8=True, rotate=False)
    k, v = outlier_randn(1, 2, 300, 64, generator=gen), outlier_randn(1, 2, 300, 64, generator=gen)
    c.append(k, v)
    q = outlier_randn(1, 4, 1, 64, generator=gen)
    kq, vq = [x.unsqueeze(0).float() for x in c.dequantize_row(0)]
    lens = c._lens.cpu()
    e8 = ref.quant_decode_attention(q, c.q["k_codes"], c.q["k_scale"], c.q["k_zero"], c.q["v_codes"],
                                    c.q["v_scale"], c.q["v_zero"], c.k_fp, c.v_fp, lens, 2, 2, c.k_group, c.v_group,
                                    qk_int8=True)
    assert_rows_close(c.attend(q), e8, 1e-3)
