"""Training data for CLIP distillation: a fixed, indexed pool of captioned images and the collate that tokenizes.

Each sample carries ``index``, its place in the pool, so the teacher's embeddings of it can be cached and read back
(vlkd.clip.cache). A finite dataset is its own pool. An unlimited one (the on-the-fly ``shapes`` train split) is cut
to its first ``pool_size`` samples, drawn once and then kept in memory as uint8, so that the teacher's outputs for
every sample can be computed once and no epoch pays for drawing again.

Captions are fixed per index for the same reason. With ``reduce_captions`` (shapes only) about half of them are
cut to a random subset of their attributes (the choice seeded by the index): zero-shot prompts name a colour
and/or a shape, and a student text tower that saw only full captions would meet them for the first time.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vlkd.errors import DataError, RecipeError

ATTRIBUTES = ("size", "color", "shape", "position")
REDUCED_CAPTION_PROB = 0.5
KEEP_ATTRIBUTE_PROB = 0.5
_CAPTION_SEED = 0x5EED  # keeps the caption stream apart from any image stream that might also use the index


class CaptionPool(Dataset):
    """``dataset`` (or its first ``pool_size`` samples when it is unlimited) with ``index`` in every sample."""

    unlimited = False

    def __init__(self, dataset: Any, pool_size: int | None = None, *, reduce_captions: bool = False):
        self.dataset = dataset
        self.spec = getattr(dataset, "spec", type(dataset).__name__)
        self.unlimited_source = bool(getattr(dataset, "unlimited", False))
        if self.unlimited_source and not pool_size:
            raise RecipeError(f"dataset {self.spec!r} is unlimited; set method.pool_size to draw a fixed pool from it")
        self.length = min(pool_size, len(dataset)) if pool_size else len(dataset)
        self.reducer = CaptionReducer(dataset) if reduce_captions else None
        self._kept: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside the pool of {self.length}")
        if index in self._kept:
            sample = dict(self._kept[index])
            sample["pixel_values"] = sample["pixel_values"].float().div_(127.5).sub_(1.0)
        else:
            sample = dict(self.dataset[index])
            if self.unlimited_source:  # drawn once: [-1, 1] pixels came from uint8 and go back exactly
                kept = dict(sample)
                kept["pixel_values"] = sample["pixel_values"].add(1.0).mul_(127.5).round_().to(torch.uint8)
                self._kept[index] = kept
        if "caption" not in sample:
            raise DataError(f"dataset {self.spec!r} has no captions; CLIP distillation trains on image-caption pairs "
                            "(shapes, csv:PATH with a caption column, hf or wds with captions)")
        if self.reducer is not None:
            sample["caption"] = self.reducer(sample["caption"], index)
        sample["index"] = index
        return sample


class CaptionReducer:
    """Cut a shapes caption to a random subset of its attributes (colour or shape always kept), seeded by index."""

    def __init__(self, dataset: Any):
        vocab = getattr(dataset, "vocab", None)
        if vocab is None or not hasattr(vocab, "caption"):
            raise RecipeError(f"method.reduce_captions needs the shapes dataset's caption format; "
                              f"{getattr(dataset, 'spec', dataset)!r} has none: set it to false")
        self.format = vocab.caption
        pattern = re.escape(vocab.caption)
        for name in ATTRIBUTES:
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>.+?)")
        self.pattern = re.compile(pattern)

    def __call__(self, caption: str, index: int) -> str:
        rng = np.random.default_rng([_CAPTION_SEED, index])
        match = self.pattern.fullmatch(caption)
        if match is None or rng.random() >= REDUCED_CAPTION_PROB:
            return caption
        kept = {name: match[name] if rng.random() < KEEP_ATTRIBUTE_PROB else "" for name in ATTRIBUTES}
        if not (kept["color"] or kept["shape"]):
            name = ("color", "shape")[int(rng.integers(2))]
            kept[name] = match[name]
        return " ".join(self.format.format(**kept).split())


class ClipCollate:
    """Stack pixels and indices, tokenize captions for the student (``text``) and, when the teacher reads another
    tokenizer, for the teacher (``teacher_text``); integer labels pass through."""

    def __init__(self, tokenizer: Any, teacher_tokenizer: Any = None):
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer

    def __call__(self, samples: Sequence[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        batch: dict[str, Any] = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                                 "text": self.tokenizer(captions)}
        if self.teacher_tokenizer is not None:
            batch["teacher_text"] = self.teacher_tokenizer(captions)
        for key, value in samples[0].items():
            if key not in batch and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                batch[key] = torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)
        return batch
