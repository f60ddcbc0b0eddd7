"""Batching dict samples."""

from __future__ import annotations

from typing import Any

from torch.utils.data import default_collate

from vlkd.errors import DataError


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and ints into tensors per key, and keep strings as lists (torch's default_collate rules)."""
    if not samples:
        raise DataError("cannot collate an empty list of samples; use a batch size of at least 1")
    keys = set(samples[0])
    for sample in samples[1:]:
        if set(sample) != keys:
            raise DataError(
                f"samples in one batch have different keys ({sorted(keys)} vs {sorted(sample)}); "
                "batch samples of one dataset only"
            )
    return default_collate(samples)
