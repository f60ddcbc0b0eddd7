"""A small digits classifier whose penultimate layer is a fast, domain-specific FID feature space.

Inception features of 16x16 greyscale digits say little about digit shape; a classifier trained on the digits
themselves does (the usual practice for MNIST-like data). It ships, trained by
``scripts/train_digits_classifier.py``, in ``assets/classifiers/digits-classifier/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlkd.errors import ModelLoadError

FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """Three 3x3 conv layers and two linear layers on 1x16x16 images in [-1, 1]."""

    def __init__(self, image_size: int = 16, num_classes: int = 10):
        super().__init__()
        self.image_size = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (any size, 1 or 3 channels) -> float 1xSxS in [-1, 1]."""
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, 128) of prepared images."""
        return self.features(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def default_classifier_dir() -> Path:
    """Where the shipped classifier lives."""
    from vlkd.data import assets_dir

    return assets_dir() / "classifiers" / "digits-classifier"


def load_digits_classifier(folder: str | Path | None = None) -> DigitsClassifier:
    """Load the classifier (``config.json`` + ``model.safetensors``) in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder else default_classifier_dir()
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config.is_file():
        raise ModelLoadError(f"digits classifier not found in {folder}; run scripts/train_digits_classifier.py")
    settings = json.loads(config.read_text())
    model = DigitsClassifier(image_size=settings["image_size"], num_classes=settings["num_classes"])
    model.load_state_dict(load_file(weights))
    return model.eval().requires_grad_(False)
