"""hash_encode kernel paths: on CUDA, T >= 16 rows with D % 8 == 0 and D <= 256 take the
tensor-core kernel (CuTe TiledMMA, TF32, 3xTF32 split), shorter inputs (decode) and other D the CUDA-core kernel; both must give
the reference's codes away from |f| ≈ 0.  (On CPU the same cases check the ATen path.)"""
import pytest
import torch

from kvengine import ops
from kvengine import reference as ref

from conftest import DEVICES, outlier_randn
from test_retrieval import bits_of, hash_weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 5, 16, 300])
@pytest.mark.parametrize("D", [36, 64, 128, 256])
@pytest.mark.parametrize("nbits", [32, 128, 256])
@pytest.mark.parametrize("mlp", [False, True])
def test_hash_encode_paths_match_reference(device, T, D, nbits, mlp, gen):
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(torch.randint(0, 3, (1,), generator=gen))]
    B, H = 2, 3
    x = outlier_randn(B, H, T, D, generator=gen).to(dtype)
    w = hash_weights(H, D, nbits, mlp, gen)
    codes = ops.hash_encode(x.to(device), *[None if t is None else t.to(device) for t in w], nbits=nbits)
    f = ref.hash_project(x, *w)
    clear = f.abs() > 1e-3 * f.abs().amax(-1, keepdim=True)
    got, exp = bits_of(codes.cpu()), bits_of(ref.hash_encode(x, *w))
    assert torch.equal(got[clear], exp[clear])
    assert clear.float().mean() > 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_hash_encode_unaligned_weights_and_strided_x(device, gen):
    """A weight view at an odd offset (4 bytes into its buffer: the tensor-core path reads weights element by element) and a
    strided x."""
    H, D, nbits, T = 2, 64, 64, 40
    buf = torch.randn(H * D * nbits + 1, generator=gen)
    w1 = buf[1:].view(H, D, nbits)
    x = outlier_randn(1, T, H, D, generator=gen).transpose(1, 2)  # [1, H, T, D], strided
    w1_dev = buf.to(device)[1:].view(H, D, nbits)  # the offset survives the move (a copy of w1 would be aligned)
    codes = ops.hash_encode(x.to(device), w1_dev)
    f = ref.hash_project(x, w1)
    clear = f.abs() > 1e-3 * f.abs().amax(-1, keepdim=True)
    assert torch.equal(bits_of(codes.cpu())[clear], bits_of(ref.hash_encode(x, w1))[clear])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nbits", [64, 128])
def test_hash_encode_shared_weights_tensor_core_path(device, nbits, gen):
    """Weights shared by every head (w1 [D, nbits]) with enough rows for the tensor-core path (several 64-row tiles,
    a partial last one), fp16 x."""
    B, H, T, D = 2, 3, 150, 64
    x = outlier_randn(B, H, T, D, generator=gen).to(torch.float16)
    w = hash_weights(1, D, nbits, True, gen, shared=True)
    codes = ops.hash_encode(x.to(device), *[None if t is None else t.to(device) for t in w])
    f = ref.hash_project(x, *w)
    clear = f.abs() > 1e-3 * f.abs().amax(-1, keepdim=True)
    assert torch.equal(bits_of(codes.cpu())[clear], bits_of(ref.hash_encode(x, *w))[clear])
    assert clear.float().mean() > 0.95
