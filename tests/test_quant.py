import pytest
import torch

import kvengine
from kvengine import ops
from kvengine import reference as ref

from conftest import DEVICES, HAS_CUDA, outlier_randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _shape_for(mode, G, lead=(2, 3), T=None, D=None):
    if mode == "per_channel":
        return (*lead, T or 3 * G, D or 64)
    return (*lead, T or 17, D or 2 * G)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["per_channel", "per_token"])
@pytest.mark.parametrize("G", [32, 64, 128, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_pack_matches_reference_bit_exact(device, bits, mode, G, dtype, gen):
    x = outlier_randn(*_shape_for(mode, G), dtype=dtype, generator=gen).to(device)
    c, s, z = ops.quantize_pack(x, bits, G, mode)
    rc, rs, rz = ref.quantize_pack(x.cpu(), bits, G, mode)
    assert c.dtype == torch.uint8 and c.shape == (*x.shape[:-1], x.shape[-1] * bits // 8)
    assert s.dtype == dtype and z.dtype == dtype
    assert torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)
    assert torch.equal(c.cpu(), rc)
    y = ops.dequantize(c, s, z, bits, G, mode, dtype)
    assert torch.equal(y.cpu(), ref.dequantize(rc, rs, rz, bits, G, mode, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("meta_dtype", DTYPES)
@pytest.mark.parametrize("mode", ["per_channel", "per_token"])
def test_meta_dtype(device, meta_dtype, mode, gen):
    x = outlier_randn(3, 64, 128, generator=gen).to(device)
    c, s, z = ops.quantize_pack(x, 2, 32, mode, meta_dtype)
    rc, rs, rz = ref.quantize_pack(x.cpu(), 2, 32, mode, meta_dtype)
    assert s.dtype == meta_dtype
    assert torch.equal(c.cpu(), rc) and torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["per_channel", "per_token"])
def test_round_trip_error_is_bounded_by_half_step(device, bits, mode, gen):
    x = outlier_randn(2, 4, 64, 128, generator=gen).to(device)
    q = kvengine.quantize_pack(x, bits, 32, mode)
    y = kvengine.dequantize(q)
    # each element is within half a quantization step of its value (plus fp32 rounding)
    s = q.scale.unsqueeze(-2).expand(*q.scale.shape[:-1], 32, 128).reshape(x.shape) if mode == "per_channel" else \
        q.scale.unsqueeze(-1).expand(*q.scale.shape, 32).reshape(x.shape)
    err = (y - x).abs()
    assert (err <= s * 0.5 * (1 + 1e-4) + 1e-5 * x.abs()).all()
    # more bits → strictly smaller error
    if bits < 8:
        y2 = kvengine.dequantize(kvengine.quantize_pack(x, bits * 2, 32, mode))
        assert (y2 - x).norm() < err.norm()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["per_channel", "per_token"])
def test_zero_range_groups_are_exact(device, dtype, mode, gen):
    x = outlier_randn(2, 64, 64, dtype=dtype, generator=gen).to(device)
    x[0] = 3.25  # one whole batch constant: every group has zero range
    x[1, :32, :32] = -7.5
    y = kvengine.dequantize(kvengine.quantize_pack(x, 2, 32, mode))
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], x[0])
    if mode == "per_channel":
        assert torch.equal(y[1, :32, :32], x[1, :32, :32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["per_channel", "per_token"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_rotate_quantize_pack_equals_composition(device, dtype, mode, D, gen):
    x = outlier_randn(2, 3, 64, D, dtype=dtype, generator=gen).to(device)
    perm = torch.randperm(D, generator=gen).to(device)
    for p, sc in ((None, None), (perm, None), (perm, 0.25)):
        fused = ops.rotate_quantize_pack(x, 2, 32, mode, sc, p)
        unfused = ops.quantize_pack(ops.fwht(x, sc, p), 2, 32, mode)
        for a, b in zip(fused, unfused):
            assert torch.equal(a, b)
    # and the reference agrees except for a few codes at rounding boundaries (fp64 vs fp32 rotation)
    rc, rs, rz = ref.rotate_quantize_pack(x.cpu(), 2, 32, mode, None, perm.cpu())
    c, s, z = ops.rotate_quantize_pack(x, 2, 32, mode, None, perm)
    mism = (ref.unpack(c.cpu(), 2) != ref.unpack(rc, 2)).float().mean().item()
    assert mism < 0.01
    torch.testing.assert_close(s.cpu().float(), rs.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_rotated_round_trip_and_rotation_helps_outliers(device, gen):
    # keys with strong outlier channels: rotation spreads them, per-token quantization error drops
    x = outlier_randn(4, 256, 128, generator=gen, outlier_scale=30.0).to(device)
    plain = kvengine.dequantize(kvengine.quantize_pack(x, 2, 32, "per_token"))
    q = kvengine.rotate_quantize_pack(x, 2, 32, "per_token")
    rot = kvengine.dequantize(q)
    assert rot.shape == x.shape and rot.dtype == x.dtype
    assert (rot - x).norm() < (plain - x).norm()
    q8 = kvengine.rotate_quantize_pack(x, 8, 32, "per_channel", perm=torch.randperm(128, generator=gen).to(device))
    torch.testing.assert_close(kvengine.dequantize(q8), x, rtol=0.02, atol=0.02 * x.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_kv_layout(device, gen):
    base = outlier_randn(2, 64, 3, 128, generator=gen).to(device)  # [B, T, H, D]
    x = base.transpose(1, 2)  # [B, H, T, D] view
    for mode in ("per_channel", "per_token"):
        a = ops.quantize_pack(x, 4, 32, mode)
        b = ops.quantize_pack(x.contiguous(), 4, 32, mode)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        a = ops.rotate_quantize_pack(x, 4, 32, mode)
        b = ops.rotate_quantize_pack(x.contiguous(), 4, 32, mode)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_quant_opcheck(gen):
    x = outlier_randn(2, 64, 64, generator=gen)
    torch.library.opcheck(torch.ops.kvengine.quantize_pack.default, (x, 2, 32, "per_channel", None))
    torch.library.opcheck(torch.ops.kvengine.quantize_pack.default, (x, 4, 32, "per_token", torch.float16))
    torch.library.opcheck(torch.ops.kvengine.rotate_quantize_pack.default,
                          (x, 2, 32, "per_token", None, torch.randperm(64), None))
    c, s, z = ops.quantize_pack(x, 2, 32, "per_channel")
    torch.library.opcheck(torch.ops.kvengine.dequantize.default, (c, s, z, 2, 32, "per_channel", torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_quant_opcheck_cuda(gen):
    x = outlier_randn(2, 64, 128, generator=gen).cuda().bfloat16()
    torch.library.opcheck(torch.ops.kvengine.quantize_pack.default, (x, 2, 32, "per_channel", None))
    torch.library.opcheck(torch.ops.kvengine.rotate_quantize_pack.default, (x, 2, 32, "per_token", None, None, None))
    c, s, z = ops.quantize_pack(x, 2, 32, "per_channel")
    torch.library.opcheck(torch.ops.kvengine.dequantize.default, (c, s, z, 2, 32, "per_channel", torch.float16))
    with pytest.raises(ValueError, match="scale is on cpu"):
        ops.dequantize(c, s.cpu(), z, 2, 32, "per_channel", torch.float16)


def test_quant_bad_inputs():
    x = torch.randn(2, 64, 64)
    with pytest.raises(ValueError, match="bits must be 1, 2, 4 or 8, got 3"):
        ops.quantize_pack(x, 3, 32, "per_channel")
    with pytest.raises(ValueError, match=r"group_size \(48\) must divide the token axis"):
        ops.quantize_pack(x, 2, 48, "per_channel")
    with pytest.raises(ValueError, match=r"group_size \(48\) must divide the channel axis"):
        ops.quantize_pack(x, 2, 48, "per_token")
    with pytest.raises(ValueError, match="group_size must be positive"):
        ops.quantize_pack(x, 2, 0, "per_token")
    with pytest.raises(ValueError, match="mode must be 'per_channel' or 'per_token'"):
        ops.quantize_pack(x, 2, 32, "per_head")
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        ops.quantize_pack(x.double(), 2, 32, "per_token")
    with pytest.raises(ValueError, match="x is empty"):
        ops.quantize_pack(torch.randn(2, 0, 64), 2, 32, "per_token")
    with pytest.raises(ValueError, match="at least 2 dims"):
        ops.quantize_pack(torch.randn(64), 2, 32, "per_token")
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        ops.quantize_pack(torch.randn(32, 12), 1, 32, "per_channel")
    with pytest.raises(ValueError, match="meta_dtype must be"):
        ops.quantize_pack(x, 2, 32, "per_token", torch.float64)
    with pytest.raises(ValueError, match=r"channel axis \(dim -1\) to rotate must be a power of two"):
        ops.rotate_quantize_pack(torch.randn(2, 32, 96), 2, 32, "per_token")
    with pytest.raises(ValueError, match="perm must be a permutation"):
        ops.rotate_quantize_pack(x, 2, 32, "per_token", None, torch.zeros(64, dtype=torch.long))
    c, s, z = ops.quantize_pack(x, 2, 32, "per_channel")
    with pytest.raises(ValueError, match="codes must be uint8"):
        ops.dequantize(c.int(), s, z, 2, 32, "per_channel", torch.float32)
    with pytest.raises(ValueError, match=r"scale must have shape \[2, 2, 64\]"):
        ops.dequantize(c, s[:, :1], z, 2, 32, "per_channel", torch.float32)
    with pytest.raises(ValueError, match="zero .* and scale .* must have the same dtype"):
        ops.dequantize(c, s, z.half(), 2, 32, "per_channel", torch.float32)
    with pytest.raises(ValueError, match="dtype must be float32"):
        ops.dequantize(c, s, z, 2, 32, "per_channel", torch.int32)


def test_quant_size_limits():
    """Sizes past the kernels' 32-bit group / channel indices are rejected before anything is allocated (expanded
    views: no memory behind the huge dims)."""
    rows = torch.zeros(1, 8).expand(2**31, 8)  # T = 2^31
    with pytest.raises(ValueError, match=r"group_size must be < 2\^31, got 2147483648"):
        ops.quantize_pack(rows, 1, 2**31, "per_channel")
    wide = torch.zeros(1, 1).expand(1, 2**31)  # D = 2^31
    with pytest.raises(ValueError, match=r"channel axis \(dim -1, size 2147483648\) must be < 2\^31"):
        ops.quantize_pack(wide, 8, 1, "per_token")
    with pytest.raises(ValueError, match=r"channel axis \(dim -1, size 2147483648\) must be < 2\^31"):
        ops.rotate_quantize_pack(wide, 8, 1, "per_token")
    codes = torch.zeros(1, 1, dtype=torch.uint8).expand(1, 2**31)
    with pytest.raises(ValueError, match=r"channel axis \(dim -1, size 2147483648\) must be < 2\^31"):
        ops.dequantize(codes, torch.zeros(1, 1), torch.zeros(1, 1), 8, 1, "per_token", torch.float32)
