"""CLIP losses as small classes in a registry, and the training method that runs them.

A loss is called as ``loss(student_outputs, teacher_outputs, batch)`` and returns a dict of named terms.
Outputs are open_clip's CLIP outputs as a dict: ``image_features`` and ``text_features`` (L2-normalised),
``logit_scale`` (already exponentiated) and, for SigLIP-style models, ``logit_bias``. ``teacher_outputs`` is
None when a model trains without a teacher. A distilled student (vlkd.clip.models.ClipStudent) also gives
``image_distill_features`` / ``text_distill_features``: its embeddings through linear heads into the teacher's
width, normalised (the plain features when the widths agree); the losses that compare student with teacher
embeddings (FD, ICL) use those.

Distillation losses, as CLIP-KD (Yang et al., CVPR 2024) defines them:
- ``fd``: MSE between normalised student and teacher embeddings, images and texts (CLIP-KD weights it ~2000);
- ``icl``: InfoNCE of student images against teacher texts and student texts against teacher images, at the
  student's logit scale;
- ``affinity_kl`` (also ``crd``): KL(teacher || student) between the softmaxes of each model's own image-text
  logits (each at its own logit scale), divided by a temperature, both directions averaged, times T^2.
  open_clip's ``DistillClipLoss`` is the soft cross-entropy form of the same thing: equal to this at T = 1 plus
  the teacher's entropy, a constant, so the gradients are the same; TinyCLIP's affinity mimicking is the same.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkd.distributed import gather, gather_with_grad, num_processes
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


def clip_outputs(model: nn.Module, batch: dict, text_key: str = "text") -> Outputs:
    """Run a CLIP on ``batch["pixel_values"]`` and ``batch[text_key]`` (token ids, or None); outputs as a dict."""
    outputs = model(batch["pixel_values"], batch[text_key] if text_key else None)
    return outputs if isinstance(outputs, dict) else dict(zip(_OUTPUT_NAMES, outputs))


def _distill_features(student: Outputs, teacher: Outputs, kind: str, loss: str) -> torch.Tensor:
    features = student.get(f"{kind}_distill_features", student[f"{kind}_features"])
    if features.shape[-1] != teacher[f"{kind}_features"].shape[-1]:
        raise RecipeError(f"{loss}: student {kind} embeddings ({features.shape[-1]}) and the teacher's "
                          f"({teacher[f'{kind}_features'].shape[-1]}) differ in width; build the student with "
                          "vlkd.clip.models.build_student, which adds projection heads")
    return features


def _caption_matches(batch: dict) -> torch.Tensor | None:
    """(B, B) bool: pairs whose token ids are identical (the same caption), or None without tokens."""
    text = batch.get("text")
    return None if text is None else (text[:, None, :] == text[None, :, :]).all(-1)


def _need_teacher(teacher: Outputs | None, loss: str) -> Outputs:
    if teacher is None:
        raise RecipeError(f"the {loss} loss distills from a teacher; this run has none")
    return teacher


@register_loss("fd")
class FeatureDistillationLoss:
    """CLIP-KD's FD: mean squared error between normalised student and teacher embeddings, image and text."""

    def __init__(self, weight: float = 1.0, image: bool = True, text: bool = True):
        self.weight, self.image, self.text = weight, image, text

    def __call__(self, student: Outputs, teacher: Outputs | None, batch: dict) -> dict[str, torch.Tensor]:
        teacher = _need_teacher(teacher, "fd")
        terms = {}
        for kind in ("image",) * self.image + ("text",) * self.text:
            features = _distill_features(student, teacher, kind, "fd")
            terms[f"fd_{kind}"] = self.weight * F.mse_loss(features, teacher[f"{kind}_features"].to(features.dtype))
        return terms


@register_loss("icl")
class InteractiveContrastiveLoss:
    """CLIP-KD's ICL: student images against teacher texts, student texts against teacher images (InfoNCE at the
    student's logit scale); identical captions count as matches, as in the contrastive loss."""

    def __init__(self, weight: float = 1.0, duplicates_match: bool = True):
        self.weight, self.duplicates_match = weight, duplicates_match

    def __call__(self, student: Outputs, teacher: Outputs | None, batch: dict) -> dict[str, torch.Tensor]:
        teacher = _need_teacher(teacher, "icl")
        image = _distill_features(student, teacher, "image", "icl")
        text = _distill_features(student, teacher, "text", "icl")
        scale = student["logit_scale"]
        image_to_text = scale * image @ teacher["text_features"].to(image.dtype).T
        text_to_image = scale * text @ teacher["image_features"].to(text.dtype).T
        positives = _caption_matches(batch) if self.duplicates_match else None
        # Row i of each holds a student anchor against every teacher candidate: the rows are the two directions.
        loss = (_anchored_cross_entropy(image_to_text, positives)
                + _anchored_cross_entropy(text_to_image, positives)) / 2
        return {"icl": self.weight * loss}


def _anchored_cross_entropy(logits: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    if positives is None:
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))
    targets = positives.float()
    return F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))


@register_loss("affinity_kl")
@register_loss("crd")
class AffinityKLLoss:
    """KL(teacher || student) between image->text and text->image similarity distributions, each model's logits
    (its own logit scale times cosine) divided by ``temperature``; the two directions averaged, times T^2."""

    def __init__(self, weight: float = 1.0, temperature: float = 1.0):
        if temperature <= 0:
            raise RecipeError(f"affinity_kl: temperature must be positive, got {temperature}")
        self.weight, self.temperature = weight, temperature

    def __call__(self, student: Outputs, teacher: Outputs | None, batch: dict) -> dict[str, torch.Tensor]:
        teacher = _need_teacher(teacher, "affinity_kl")
        t = self.temperature
        student_logits = student["logit_scale"] * student["image_features"] @ student["text_features"].T / t
        teacher_logits = (teacher["logit_scale"] * teacher["image_features"] @ teacher["text_features"].T / t)
        teacher_logits = teacher_logits.to(student_logits.dtype)
        loss = (_kl(teacher_logits, student_logits) + _kl(teacher_logits.T, student_logits.T)) / 2
        return {"affinity_kl": self.weight * t * t * loss}


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(softmax(teacher) || softmax(student)), averaged over rows."""
    return F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), reduction="batchmean",
                    log_target=True)


class ClipLossMethod:
    """A training method (``method(student, teacher, batch)``) summing named CLIP losses; the teacher, if any,
    runs without gradients. After each optimizer step the student's temperature is capped as CLIP caps it.

    ``cache`` (vlkd.clip.cache.TeacherCache): teacher outputs read by ``batch["index"]`` instead of running the
    teacher. Teacher tokens are ``batch["teacher_text"]`` when the two tokenizers differ. ``shared_text``: the
    student's text tower is the teacher's, frozen (locked text), so its text embeddings are the teacher's and
    are not computed twice.
    """

    def __init__(self, losses: Sequence[Any], cache: Any = None, shared_text: bool = False):
        if not losses:
            raise RecipeError("a CLIP method needs at least one loss; name one of: " + ", ".join(sorted(LOSSES)))
        self.losses = list(losses)
        self.cache, self.shared_text = cache, shared_text

    def teacher_outputs(self, teacher: nn.Module | None, batch: dict) -> Outputs | None:
        """From the cache when it holds the batch, else from the teacher (without gradients), else None."""
        if self.cache is not None and "index" in batch:
            return self.cache.lookup(batch["index"])
        if teacher is None:
            return None
        with torch.no_grad():
            return clip_outputs(teacher, batch, "teacher_text" if "teacher_text" in batch else "text")

    def __call__(self, student: nn.Module, teacher: nn.Module | None, batch: dict) -> dict[str, torch.Tensor]:
        teacher_outputs = self.teacher_outputs(teacher, batch)
        if self.shared_text and teacher_outputs is not None:
            student_outputs = clip_outputs(student, batch, text_key="")
            text = teacher_outputs["text_features"]
            student_outputs["text_features"] = student_outputs["text_distill_features"] = text
        else:
            student_outputs = clip_outputs(student, batch)
        if num_processes() > 1:
            student_outputs, teacher_outputs, batch = _global_batch(student_outputs, teacher_outputs, batch)
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


def _global_batch(student: Outputs, teacher: Outputs | None, batch: dict) -> tuple[Outputs, Outputs | None, dict]:
    """Each process's per-sample outputs and tokens gathered into the global batch (in-batch losses need every
    negative), so a multi-process run computes the loss a one-process run would."""

    def whole(outputs: Outputs) -> Outputs:
        return {name: (gather_with_grad(value) if value.requires_grad else gather(value))
                if isinstance(value, torch.Tensor) and value.dim() > 0 else value for name, value in outputs.items()}

    tokens = {"text": gather(batch["text"])} if isinstance(batch.get("text"), torch.Tensor) else {}
    return whole(student), None if teacher is None else whole(teacher), {**batch, **tokens}
