"""``digits[:SIZE]``: scikit-learn's 8x8 handwritten digits, upsampled, with a fixed train/test split."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from vlkd.data.assets import load_asset_json
from vlkd.data.base import VlkdDataset, check_split, resolve_size

DIGITS_SPLITS = ("train", "test", "all")
DEFAULT_SIZE = 16
TEST_COUNT = 300
# The split is fixed (not seeded per run) so every run is evaluated on the same 300 images.
SPLIT_RANDOM_STATE = 0
# load_digits() pixels count ink from 0 to 16.
MAX_INK = 16.0


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as (N, 8, 8) float32 ink values 0..16, and their int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.from_numpy(data.images.astype(np.float32)), torch.from_numpy(data.target.astype(np.int64))


@lru_cache(maxsize=4)
def digits_pixels(image_size: int) -> torch.Tensor:
    """All 1,797 images as (N, 1, S, S) float32 in [-1, 1], upsampled bilinearly (computed once per size)."""
    images = digits_arrays()[0].unsqueeze(1) * (2.0 / MAX_INK) - 1.0
    if image_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
    return images.clamp_(-1.0, 1.0)


@lru_cache(maxsize=3)
def digits_split_indices(split: str) -> torch.Tensor:
    """Indices into ``load_digits()`` for a split: a stratified 1,497/300 split with random_state=0, sorted."""
    labels = digits_arrays()[1].numpy()
    everything = np.arange(len(labels))
    if split == "all":
        return torch.from_numpy(everything)
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(everything, test_size=TEST_COUNT, random_state=SPLIT_RANDOM_STATE, stratify=labels)
    return torch.from_numpy(np.sort(train if split == "train" else test))


class DigitsDataset(VlkdDataset):
    """Greyscale digits with ``label`` 0..9; pixels are computed on first access and shared by all instances."""

    def __init__(self, spec: str, split: str, image_size: int) -> None:
        assets = load_asset_json("datasets/digits.json")
        super().__init__(
            spec=spec,
            split=split,
            image_size=image_size,
            channels=1,
            tasks=assets["tasks"],
            default_task=assets["default_task"],
            task_templates=assets["templates"],
        )
        self.indices = digits_split_indices(split)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        source_index = int(self.indices[self._checked_index(index)])
        # A copy, so a consumer writing into its batch cannot corrupt the shared cache.
        return {
            "pixel_values": digits_pixels(self.image_size)[source_index].clone(),
            "label": int(digits_arrays()[1][source_index]),
        }


def build_digits(
    spec: str, size_text: str, split: str, seed: int | None, *, image_size: int | None = None
) -> DigitsDataset:
    """Build ``digits[:SIZE]``; ``seed`` is unused because the split is fixed."""
    check_split(spec, split, DIGITS_SPLITS)
    size = resolve_size(spec, size_text, image_size, DEFAULT_SIZE, minimum=8, maximum=1024)
    return DigitsDataset(spec, split, size)
