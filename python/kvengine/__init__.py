"""kvengine — compressed KV caches and low-bit attention as PyTorch custom ops (CPU + CUDA).

Importing kvengine loads the native extension, which registers ``torch.ops.kvengine.*``.
"""
from __future__ import annotations

import torch

__version__ = "0.1.0"


def _load_extension():
    try:
        from . import _build_config
    except ImportError as e:  # running from a source tree that was never built
        raise ImportError(
            "kvengine: the native extension is not built. Install with "
            "`pip install --no-build-isolation .` (see README.md)."
        ) from e
    if _build_config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"kvengine was built against torch {_build_config.TORCH_VERSION} but torch {torch.__version__} is "
            "installed; rebuild kvengine (`pip install --no-build-isolation --force-reinstall .`)."
        )
    from . import _C

    return _C


_C = _load_extension()


def build_info() -> dict:
    """Version, CUDA on/off, compiled CUDA architectures, CUTLASS version, torch version built against, CPU ISA."""
    return dict(_C.build_info())


from . import ops, reference  # noqa: E402  (ops registers fakes and autograd)
from .ops import fwht, fwht_, rotate  # noqa: E402
from .cache import QuantizedKVCache, detect_sinks  # noqa: E402
from .quant import QuantizedTensor, dequantize, quantize_pack, rotate_quantize_pack  # noqa: E402

__all__ = [
    "build_info",
    "fwht",
    "fwht_",
    "rotate",
    "quantize_pack",
    "rotate_quantize_pack",
    "dequantize",
    "QuantizedTensor",
    "QuantizedKVCache",
    "detect_sinks",
    "ops",
    "reference",
]

# ---- 1-bit QK attention (BinaryAttention)
from .ops import binary_attention, binary_attention_packed, sign_pack  # noqa: E402

__all__ += ["sign_pack", "binary_attention", "binary_attention_packed"]

# ---- hash-based top-k KV retrieval (Spotlight Attention)
from .ops import hamming_topk, hash_encode, sparse_decode_attention  # noqa: E402
from .retrieval import HashCodeCache, RetrievalAttention, SpotlightHash  # noqa: E402

__all__ += ["hash_encode", "hamming_topk", "sparse_decode_attention", "HashCodeCache", "RetrievalAttention",
            "SpotlightHash"]

# ---- per-layer automatic configuration (calibration under a bit budget)
from .autoconfig import AutoPlan, Scheme, calibrate  # noqa: E402

__all__ += ["calibrate", "AutoPlan", "Scheme"]
