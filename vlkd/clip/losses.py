"""CLIP losses as small classes in a registry, and the training method that runs them.

A loss is called as ``loss(student_outputs, teacher_outputs, batch)`` and returns a dict of named terms.
Outputs are open_clip's CLIP outputs as a dict: ``image_features`` and ``text_features`` (L2-normalised),
``logit_scale`` (already exponentiated) and, for SigLIP-style models, ``logit_bias``. ``teacher_outputs`` is
None when a model trains without a teacher.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkd.errors import RecipeError

Outputs = dict[str, torch.Tensor]
LOSSES: dict[str, type] = {}
# CLIP's cap on the learned temperature: logits never exceed 100 x cosine.
MAX_LOGIT_SCALE = 100.0
_OUTPUT_NAMES = ("image_features", "text_features", "logit_scale", "logit_bias")


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator: make a loss class buildable by ``name`` from a recipe."""

    def add(cls: type) -> type:
        LOSSES[name] = cls
        return cls

    return add


def build_loss(name: str, **hyperparameters: Any) -> Any:
    """An instance of the loss registered as ``name``."""
    if name not in LOSSES:
        raise RecipeError(f"unknown CLIP loss {name!r}; use one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**hyperparameters)


def contrastive_loss(logits_per_image: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy over image->text and text->image logits (B, B).

    ``positives`` (B, B bool) marks every pair that matches, e.g. images whose captions are identical; the
    target spreads evenly over them. None: only the diagonal matches (CLIP's loss).
    """
    if positives is None:
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
    targets = positives.float()
    per_image = targets / targets.sum(1, keepdim=True)
    per_text = targets.T / targets.T.sum(1, keepdim=True)
    return (F.cross_entropy(logits_per_image, per_image) + F.cross_entropy(logits_per_image.T, per_text)) / 2


@register_loss("contrastive")
class ClipContrastiveLoss:
    """CLIP's InfoNCE between the student's own images and texts; identical captions in a batch count as matches
    (with few distinct captions, treating duplicates as negatives would push apart what should meet)."""

    def __init__(self, weight: float = 1.0, duplicates_match: bool = True):
        self.weight = weight
        self.duplicates_match = duplicates_match

    def __call__(self, student: Outputs, teacher: Outputs | None, batch: dict) -> dict[str, torch.Tensor]:
        logits = student["logit_scale"] * student["image_features"] @ student["text_features"].T
        if "logit_bias" in student:
            logits = logits + student["logit_bias"]
        positives = None
        if self.duplicates_match and "text" in batch:
            text = batch["text"]
            positives = (text[:, None, :] == text[None, :, :]).all(-1)
        return {"contrastive": self.weight * contrastive_loss(logits, positives)}


def clip_outputs(model: nn.Module, batch: dict) -> Outputs:
    """Run an open_clip CLIP on ``batch["pixel_values"]`` and ``batch["text"]`` (token ids); outputs as a dict."""
    outputs = model(batch["pixel_values"], batch["text"])
    return outputs if isinstance(outputs, dict) else dict(zip(_OUTPUT_NAMES, outputs))


class ClipLossMethod:
    """A training method (``method(student, teacher, batch)``) summing named CLIP losses; the teacher, if any,
    runs without gradients. After each optimizer step the student's temperature is capped as CLIP caps it."""

    def __init__(self, losses: Sequence[Any]):
        if not losses:
            raise RecipeError("a CLIP method needs at least one loss; name one of: " + ", ".join(sorted(LOSSES)))
        self.losses = list(losses)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: dict) -> dict[str, torch.Tensor]:
        student_outputs = clip_outputs(student, batch)
        teacher_outputs = None
        if teacher is not None:
            with torch.no_grad():
                teacher_outputs = clip_outputs(teacher, batch)
        terms: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            for name, value in loss(student_outputs, teacher_outputs, batch).items():
                if name in terms:
                    raise RecipeError(f"two CLIP losses both return a term named {name!r}; give each loss once")
                terms[name] = value
        return terms

    def after_step(self, student: nn.Module) -> None:
        """Clamp the learned log temperature at log(100), as open_clip's training loop does."""
        scale = getattr(student, "logit_scale", None)
        if isinstance(scale, torch.Tensor):
            with torch.no_grad():
                scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
