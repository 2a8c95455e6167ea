"""Pieces shared by the transformers cache layers of kvengine (``KVEngineLayer``, ``RetrievalLayer``)."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands ``cache`` to ``model(...)`` / ``model.generate(...)``: ``cache`` where the model's forward
    takes it (transformers ≥ 5.24, which deprecates ``past_key_values`` and drops it from forward in 5.40), else
    ``past_key_values`` (4.56 – 5.23)."""
    fwd = getattr(model, "forward", None)
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        params = {}
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def crop_count(tokens_to_remove: int, seq_len: int) -> int:
    """How many newest tokens a transformers ``crop(x)`` call removes: ``-x`` for x < 0 (transformers ≥ 5), or down
    to an absolute length x for x > 0 (the 4.x ``crop(max_length)`` convention); 0 removes nothing."""
    x = int(tokens_to_remove)
    if x < 0:
        if -x > seq_len:
            raise ValueError(f"crop: cannot remove {-x} tokens from a cache of {seq_len}")
        return -x
    return max(0, seq_len - x) if x > 0 else 0


class EditableLayerMixin:
    """Beam search (``reorder_cache``), batch selection / repetition and ``crop`` (assisted and prompt-lookup
    decoding) for a cache layer that implements ``_select_rows(index)`` (row i becomes row index[i]),
    ``_truncate(n)`` (drop the n newest tokens, raising a clear error where it cannot), ``_croppable()``,
    ``_batch_size()`` and keeps ``cumulative_length`` and ``_pending`` (an update not yet attended)."""

    @property
    def is_croppable(self) -> bool:
        return self._croppable()

    def _check_idle(self, what: str) -> None:
        if self._pending:
            raise RuntimeError(f"{type(self).__name__}.{what}: called between a cache update and its attention")

    def reorder_cache(self, beam_idx) -> None:
        if self.cumulative_length:
            self._check_idle("reorder_cache")
            self._select_rows(beam_idx)

    def batch_select_indices(self, indices) -> None:
        if self.cumulative_length:
            self._check_idle("batch_select_indices")
            self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cumulative_length and repeats != 1:
            self._check_idle("batch_repeat_interleave")
            if repeats < 1:
                raise ValueError(f"batch_repeat_interleave: repeats must be >= 1, got {repeats}")
            self._select_rows(torch.arange(self._batch_size()).repeat_interleave(int(repeats)))

    def crop(self, tokens_to_remove: int) -> None:
        n = crop_count(tokens_to_remove, self.cumulative_length)
        if n and self.cumulative_length:
            self._check_idle("crop")
            self._truncate(n)
            self.cumulative_length -= n


def real_tokens(mask: Optional[Tensor], B: int, n_kv: int) -> Optional[Tensor]:
    """[B, n_kv] bool: the key positions the last query may attend (the real tokens of a left-padded batch), from
    a 4-D attention mask (bool, or additive float); None when there is no such mask."""
    if mask is None or mask.dim() != 4:
        return None
    row = mask[:, 0, -1, -n_kv:]
    real = row if row.dtype == torch.bool else row == 0
    return real.expand(B, -1)


def check_cached_padding(mask: Optional[Tensor], B: int, n_kv: int, T: int, row_lens: list, who: str) -> None:
    """At decode: the cache holds only real tokens (a left-padded prompt was appended without its padding), so the
    mask's count of real tokens among the n_kv - T cached positions must equal each row's cached length."""
    real = real_tokens(mask, B, n_kv)
    if real is None:
        return
    n_real = real[:, : n_kv - T].sum(1).tolist()
    if n_real != list(row_lens):
        raise NotImplementedError(f"{who}: the padding mask marks {n_real} cached tokens per row as real, the cache "
                                  f"holds {list(row_lens)}: only left padding of the prompt is supported")
