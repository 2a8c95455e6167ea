import math

import pytest
import torch

import kvengine
from kvengine import reference as ref

from conftest import DEVICES, outlier_randn

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192, 32768])
def test_fwht_matches_reference(device, dtype, n, gen):
    rows = max(1, min(37, 65536 // n))
    x = outlier_randn(rows, n, dtype=dtype, generator=gen, outlier_scale=5.0).to(device)
    y = kvengine.fwht(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    expect = ref.fwht(x.cpu().double()).to(torch.float64)
    assert rel_err(y.cpu(), expect) < TOL[dtype]
    # elementwise: every element written and finite
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 64), (1, 128), (2, 3, 7, 128), (11, 256)])
def test_fwht_leading_shapes_scale_perm(device, shape, gen):
    x = outlier_randn(*shape, generator=gen).to(device)
    n = shape[-1]
    perm = torch.randperm(n, generator=gen).to(device)
    for scale in (None, 0.5, 1.0):
        y = kvengine.fwht(x, scale, perm)
        e = ref.fwht(x.cpu().double(), scale, perm.cpu())
        assert rel_err(y.cpu(), e) < 2e-6
    # int32 perm works the same
    torch.testing.assert_close(kvengine.fwht(x, None, perm.int()), kvengine.fwht(x, None, perm))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fwht_round_trip(device, dtype, gen):
    x = outlier_randn(4, 9, 128, dtype=dtype, generator=gen).to(device)
    back = kvengine.fwht(kvengine.fwht(x.float())).to(dtype)
    torch.testing.assert_close(back, x, rtol=TOL[dtype] * 4, atol=1e-4)
    if dtype == torch.float32:
        assert rel_err(kvengine.fwht(kvengine.fwht(x)), x) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_fwht_noncontiguous_inputs(device, gen):
    base = outlier_randn(2, 64, 6, 128, generator=gen).to(device)  # [B, T, H, D]
    x = base.transpose(1, 2)  # [B, H, T, D]: the KV layout, not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(kvengine.fwht(x), kvengine.fwht(x.contiguous()))
    xs = base[..., 1:, :]  # offset view
    torch.testing.assert_close(kvengine.fwht(xs), kvengine.fwht(xs.contiguous()))
    xt = outlier_randn(128, 40, generator=gen).to(device).t()  # last dim strided
    torch.testing.assert_close(kvengine.fwht(xt), kvengine.fwht(xt.contiguous()))
    flat = outlier_randn(129 * 64, generator=gen).to(device)[1 : 1 + 128 * 64].view(128, 64)  # misaligned start (4-byte offset)
    torch.testing.assert_close(kvengine.fwht(flat), kvengine.fwht(flat.clone()))


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_head_rotation(device, gen):
    x = outlier_randn(2, 8, 5, 128, generator=gen).to(device).transpose(1, 2)  # [B, T, H, D]
    y = kvengine.rotate(x, group=4)
    e = ref.fwht(x.cpu().double().reshape(2, 5, 2, 512)).reshape(x.shape)
    assert rel_err(y.cpu(), e) < 2e-6
    with pytest.raises(ValueError, match="group"):
        kvengine.rotate(x, group=3)


@pytest.mark.parametrize("device", DEVICES)
def test_fwht_autograd(device, gen):
    n = 64
    x = outlier_randn(3, n, generator=gen).to(device).requires_grad_()
    perm = torch.randperm(n, generator=gen).to(device)
    w = torch.randn(3, n, generator=gen).to(device)
    (kvengine.fwht(x, 0.3, perm) * w).sum().backward()
    xr = x.detach().cpu().double().requires_grad_()
    (ref.fwht(xr, 0.3, perm.cpu()) * w.cpu().double()).sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-5, atol=1e-5)


def test_fwht_opcheck(gen):
    x = outlier_randn(3, 4, 64, generator=gen)
    perm = torch.randperm(64, generator=gen)
    torch.library.opcheck(torch.ops.kvengine.fwht.default, (x, None, None))
    torch.library.opcheck(torch.ops.kvengine.fwht.default, (x.requires_grad_(), 0.5, perm))


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("conftest").HAS_CUDA, reason="no CUDA GPU")
def test_fwht_opcheck_cuda(gen):
    x = outlier_randn(3, 4, 128, generator=gen).cuda()
    torch.library.opcheck(torch.ops.kvengine.fwht.default, (x, None, None))
    torch.library.opcheck(torch.ops.kvengine.fwht.default, (x.bfloat16(), 0.5, torch.randperm(128).cuda()))
    with pytest.raises(ValueError, match="perm is on cpu but the other inputs are on cuda"):
        kvengine.fwht(x, None, torch.randperm(128))


def test_fwht_bad_inputs():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"last dim of x \(n\) must be a power of two"):
        kvengine.fwht(torch.randn(4, 48))
    with pytest.raises(ValueError, match="power of two"):
        kvengine.fwht(torch.randn(1, 65536))
    with pytest.raises(ValueError, match="power of two"):
        kvengine.fwht(torch.randn(4, 1))
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        kvengine.fwht(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kvengine.fwht(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="x is empty"):
        kvengine.fwht(torch.randn(0, 64))
    with pytest.raises(ValueError, match=r"perm must have shape \[64\]"):
        kvengine.fwht(x, None, torch.arange(32))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        kvengine.fwht(x, None, torch.zeros(64, dtype=torch.long))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        kvengine.fwht(x, None, torch.arange(64) + 1)
    with pytest.raises(ValueError, match="perm must be an int32 or int64"):
        kvengine.fwht(x, None, torch.arange(64).float())


def test_reference_fwht_paths_agree(gen):
    x = torch.randn(3, 512, generator=gen, dtype=torch.float64)
    dense = (x @ ref.hadamard(512)) / math.sqrt(512)
    torch.testing.assert_close(ref.fwht(x), dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [64, 128, 2048])
def test_fwht_inplace(device, n, gen):
    x = outlier_randn(5, 3, n, generator=gen).to(device)
    perm = torch.randperm(n, generator=gen).to(device)
    expect = kvengine.fwht(x, 0.7, perm)
    y = x.clone()
    out = kvengine.fwht_(y, 0.7, perm)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    # a non-contiguous view is updated in place too
    base = outlier_randn(3, 16, 4, n, generator=gen).to(device)
    v = base.transpose(1, 2)
    expect = kvengine.fwht(v)
    kvengine.fwht_(v)
    torch.testing.assert_close(base.transpose(1, 2), expect, rtol=0, atol=0)


def test_fwht_inplace_opcheck(gen):
    x = outlier_randn(3, 4, 64, generator=gen)
    torch.library.opcheck(torch.ops.kvengine.fwht_.default, (x, None, torch.randperm(64)))
