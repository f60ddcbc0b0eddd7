"""CLIP distillation losses against values computed by hand on a two-pair example (plain math, not the losses'
own code), and affinity KL against open_clip's DistillClipLoss."""

from __future__ import annotations

import math

import pytest
import torch

from vlkd.clip.losses import LOSSES, AffinityKLLoss, ClipLossMethod, build_loss
from vlkd.errors import RecipeError


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


# Two image-caption pairs in a 2-d embedding: every cosine is cos(angle difference).
S_IMG, S_TXT = [0.0, 1.0], [0.3, 1.5]  # student angles
T_IMG, T_TXT = [0.2, 1.2], [0.1, 1.4]  # teacher angles
S_SCALE, T_SCALE = 10.0, 20.0
BATCH = {"text": torch.tensor([[2, 5, 9, 0], [2, 6, 9, 0]])}  # two different captions


def outputs(images: list[float], texts: list[float], scale: float) -> dict:
    return {"image_features": torch.tensor([unit(a) for a in images], dtype=torch.float64),
            "text_features": torch.tensor([unit(a) for a in texts], dtype=torch.float64),
            "logit_scale": torch.tensor(scale, dtype=torch.float64)}


def cross_entropy_rows(logits: list[list[float]]) -> float:
    """Mean over rows of -log softmax(row)[diagonal]."""
    return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(logits)) / len(logits)


def softmax(row: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in row)
    return [math.exp(v) / total for v in row]


def kl_rows(p_logits: list[list[float]], q_logits: list[list[float]]) -> float:
    value = 0.0
    for p_row, q_row in zip(p_logits, q_logits):
        p, q = softmax(p_row), softmax(q_row)
        value += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return value / len(p_logits)


def logits(a: list[float], b: list[float], scale: float) -> list[list[float]]:
    return [[scale * math.cos(x - y) for y in b] for x in a]


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(row) for row in zip(*m)]


def test_fd_is_the_mean_squared_error_of_normalised_embeddings():
    student, teacher = outputs(S_IMG, S_TXT, S_SCALE), outputs(T_IMG, T_TXT, T_SCALE)
    # |u(a) - u(b)|^2 = 2 - 2 cos(a - b), averaged over the 2 x 2 elements of each batch.
    image = sum(2 - 2 * math.cos(a - b) for a, b in zip(S_IMG, T_IMG)) / 4
    text = sum(2 - 2 * math.cos(a - b) for a, b in zip(S_TXT, T_TXT)) / 4
    terms = build_loss("fd", weight=2000.0)(student, teacher, BATCH)
    assert terms["fd_image"].item() == pytest.approx(2000 * image, rel=1e-9)
    assert terms["fd_text"].item() == pytest.approx(2000 * text, rel=1e-9)
    assert set(build_loss("fd", text=False)(student, teacher, BATCH)) == {"fd_image"}


def test_fd_uses_the_projected_features_when_the_student_has_heads():
    student, teacher = outputs(S_IMG, S_TXT, S_SCALE), outputs(T_IMG, T_TXT, T_SCALE)
    student["image_distill_features"] = teacher["image_features"].clone()
    student["text_distill_features"] = teacher["text_features"].clone()
    terms = build_loss("fd")(student, teacher, BATCH)
    assert terms["fd_image"].item() == 0 and terms["fd_text"].item() == 0
    student["image_distill_features"] = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(RecipeError, match="differ in width"):
        build_loss("fd")(student, teacher, BATCH)


def test_icl_is_infonce_of_student_embeddings_against_the_teachers():
    student, teacher = outputs(S_IMG, S_TXT, S_SCALE), outputs(T_IMG, T_TXT, T_SCALE)
    image_anchored = cross_entropy_rows(logits(S_IMG, T_TXT, S_SCALE))  # student's logit scale
    text_anchored = cross_entropy_rows(logits(S_TXT, T_IMG, S_SCALE))
    expected = 0.5 * (image_anchored + text_anchored) / 2
    assert build_loss("icl", weight=0.5)(student, teacher, BATCH)["icl"].item() == pytest.approx(expected, rel=1e-9)


def test_icl_counts_identical_captions_as_matches():
    student, teacher = outputs(S_IMG, S_TXT, S_SCALE), outputs(T_IMG, T_TXT, T_SCALE)
    same = {"text": torch.tensor([[2, 5, 9, 0], [2, 5, 9, 0]])}
    # Both candidates are positives: the target is uniform, the loss the cross-entropy against (1/2, 1/2).
    def uniform_ce(rows):
        return sum(math.log(sum(math.exp(v) for v in row)) - sum(row) / 2 for row in rows) / len(rows)

    expected = (uniform_ce(logits(S_IMG, T_TXT, S_SCALE)) + uniform_ce(logits(S_TXT, T_IMG, S_SCALE))) / 2
    assert build_loss("icl")(student, teacher, same)["icl"].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_affinity_kl_by_hand(temperature):
    student, teacher = outputs(S_IMG, S_TXT, S_SCALE), outputs(T_IMG, T_TXT, T_SCALE)
    t = temperature
    s_logits = [[v / t for v in row] for row in logits(S_IMG, S_TXT, S_SCALE)]
    t_logits = [[v / t for v in row] for row in logits(T_IMG, T_TXT, T_SCALE)]
    expected = t * t * (kl_rows(t_logits, s_logits) + kl_rows(transpose(t_logits), transpose(s_logits))) / 2
    loss = build_loss("affinity_kl", temperature=t)
    assert loss(student, teacher, BATCH)["affinity_kl"].item() == pytest.approx(expected, rel=1e-9)
    assert LOSSES["crd"] is AffinityKLLoss


def test_affinity_kl_equals_open_clips_distill_loss_minus_the_teacher_entropy():
    from open_clip.loss import DistillClipLoss

    student, teacher = outputs(S_IMG, S_TXT, S_SCALE), outputs(T_IMG, T_TXT, T_SCALE)
    _, distill = DistillClipLoss()(student["image_features"], student["text_features"], student["logit_scale"],
                                   teacher["image_features"], teacher["text_features"], teacher["logit_scale"])
    t_logits = logits(T_IMG, T_TXT, T_SCALE)
    entropy = sum(-sum(p * math.log(p) for p in softmax(row)) for row in t_logits + transpose(t_logits)) / 4
    ours = build_loss("affinity_kl")(student, teacher, BATCH)["affinity_kl"].item()
    assert ours + entropy == pytest.approx(distill.item(), rel=1e-9)


def test_method_sums_named_terms_and_rejects_bad_losses():
    student, teacher = outputs(S_IMG, S_TXT, S_SCALE), outputs(T_IMG, T_TXT, T_SCALE)

    class Fixed(torch.nn.Module):
        def __init__(self, result):
            super().__init__()
            self.result = result

        def forward(self, pixels, text=None):
            return dict(self.result)

    method = ClipLossMethod([build_loss("fd"), build_loss("icl"), build_loss("crd")])
    batch = {**BATCH, "pixel_values": torch.zeros(2, 3, 4, 4)}
    terms = method(Fixed(student), Fixed(teacher), batch)
    assert set(terms) == {"fd_image", "fd_text", "icl", "affinity_kl"}
    with pytest.raises(RecipeError, match="unknown CLIP loss 'fdd'"):
        build_loss("fdd")
    with pytest.raises(RecipeError, match="distills from a teacher"):
        ClipLossMethod([build_loss("fd")])(Fixed(student), None, batch)
    with pytest.raises(RecipeError, match="temperature must be positive"):
        build_loss("affinity_kl", temperature=0)


def test_recipe_loss_specs_build_weighted_losses():
    from vlkd.clip.runner import build_losses

    fd, kl = build_losses({"fd": 2000, "affinity_kl": {"weight": 0.5, "temperature": 2.0}})
    assert fd.weight == 2000 and (kl.weight, kl.temperature) == (0.5, 2.0)
    with pytest.raises(RecipeError, match=r"method.losses.icl: unknown option\(s\) temperature; it takes: weight, "
                                          r"duplicates_match"):
        build_losses({"icl": {"temperature": 2.0}})
