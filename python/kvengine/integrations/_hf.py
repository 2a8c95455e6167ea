"""Pieces shared by the transformers cache layers of kvengine (``KVEngineLayer``, ``RetrievalLayer``)."""
from __future__ import annotations

import torch


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
