"""Teacher embeddings on disk: computed once per (teacher, data, preprocessing, pool) and read back, so later
epochs never run the teacher (MobileCLIP's "dataset reinforcement", at the scale of one training pool).

A ``vlkd.cache`` pool cache holding ``image_features`` and ``text_features`` (float32, L2-normalised, rows in pool
order) and the teacher's logit scale. The key hashes what changes the numbers: the teacher's identity (file hash or
hub name), the dataset spec, split and seed, the teacher's image preprocessing and tokenizer, the caption treatment
and the pool size. For the unlimited shapes train split the pool is its first ``pool_size`` samples
(vlkd.clip.data.CaptionPool), so the same positions are cached whatever the run length.

The fill is its own pass before training (the first "epoch" of a cached run); training reads every teacher output
by ``batch["index"]``. All rows are held in memory: 2 x 4 x D bytes per sample (1 KB at D = 128; 4 KB at D = 512,
so a 3M-caption dataset wants 12 GB: shard and subsample such data before caching it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from vlkd.cache import PoolCache, cache_key, pool_cache

__all__ = ["TeacherCache", "cache_key", "teacher_cache"]


class TeacherCache(PoolCache):
    """Teacher outputs for every index of a pool: ``lookup(index)`` -> the dict a teacher forward would return."""

    @property
    def image_features(self) -> torch.Tensor:
        return self.rows["image_features"]

    @property
    def text_features(self) -> torch.Tensor:
        return self.rows["text_features"]

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised image and text embeddings and the exponentiated logit scale for pool ``index`` (B,)."""
        return {**super().lookup(index), "logit_scale": torch.tensor(self.constants["logit_scale"], device=index.device)}

    @classmethod
    def read(cls, folder: str | Path) -> "TeacherCache | None":
        """The cache in ``folder``, or None when it is absent or incomplete."""
        cache = PoolCache.read(folder)
        return None if cache is None else cls(cache.rows, cache.constants, cache.folder)


def teacher_cache(root: str | Path, key_parts: dict, teacher: Any, pool: Any, collate: Callable, *,
                  batch_size: int, device: str | torch.device = "cpu") -> TeacherCache:
    """Read the cache for ``key_parts`` under ``root``, running ``teacher`` over the pool first if it is not there."""
    teacher.to(device).eval()
    text_key = "teacher_text" if getattr(collate, "teacher_tokenizer", None) is not None else "text"

    def compute(batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        outputs = teacher(batch["pixel_values"].to(device), batch[text_key].to(device))
        return ({"image_features": outputs["image_features"].float(), "text_features": outputs["text_features"].float()},
                {"logit_scale": float(outputs["logit_scale"])})

    cache = pool_cache(root, key_parts, compute, pool, collate, batch_size=batch_size)
    return TeacherCache(cache.rows, cache.constants, cache.folder)
