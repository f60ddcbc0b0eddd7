"""Weight inheritance (TinyCLIP's manual variant): start a shallower, narrower student from its teacher's weights.

Depth: student block ``i`` of a tower with ``S`` blocks takes the teacher's block ``i (T - 1) / (S - 1)`` rounded
(half up): evenly spaced, the first and the last kept (a one-block student takes the first).
Width: the first ``k`` entries of every dimension that shrank. The residual stream keeps its first channels in
every layer, so what one layer writes is still what the next reads; attention keeps the first heads (the first
rows of each of q, k and v, which are whole heads when the head width is unchanged, and a prefix of each head's
dimensions otherwise); the MLP keeps its first hidden units. No importance ranking: the criterion is position,
which is cheap, deterministic, and lets the same channels line up across layers without any bookkeeping.
Positional embeddings of a different patch grid are resampled bicubically (as open_clip's ``resize_pos_embed``).

What does not fit is left at the student's own initialisation and listed in the report: a dimension that is
larger in the student, a patch kernel of another size, or a token embedding over another vocabulary.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkd.errors import RecipeError

_BLOCK = re.compile(r"^(.*?\b(?:resblocks|blocks|layers))\.(\d+)\.(.*)$")


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher block for each student block: evenly spaced, first and last kept."""
    if student_layers > teacher_layers:
        raise RecipeError(f"inherit: the student has {student_layers} blocks in a tower where the teacher has "
                          f"{teacher_layers}; inheritance only makes towers shallower")
    if student_layers == 1:
        return [0]
    # Half rounds up (not Python's half-to-even), so the spacing does not depend on parity.
    return [int(i * (teacher_layers - 1) / (student_layers - 1) + 0.5) for i in range(student_layers)]


def _depths(keys: Any) -> dict[str, int]:
    depths: dict[str, int] = {}
    for key in keys:
        match = _BLOCK.match(key)
        if match:
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
    return depths


def _resample_positions(weight: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """A ViT positional embedding (1 + g*g, W) resampled to ``tokens`` = 1 + h*h; None if not square grids."""
    old, new = math.isqrt(weight.shape[0] - 1), math.isqrt(tokens - 1)
    if old * old != weight.shape[0] - 1 or new * new != tokens - 1:
        return None
    grid = weight[1:].T.reshape(1, weight.shape[1], old, old).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([weight[:1], grid.reshape(weight.shape[1], new * new).T.to(weight.dtype)])


def fit_tensor(key: str, source: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``source`` cut (first entries) or resampled to ``shape``; None when it cannot be inherited."""
    if source.shape == shape:
        return source
    if source.ndim != len(shape):
        return None
    if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
        # q, k and v are stacked along dim 0: keep the first rows of each, not the first rows of the stack.
        if shape[0] % 3 or source.shape[0] % 3:
            return None
        inner = fit_tensor("", source.reshape(3, source.shape[0] // 3, *source.shape[1:]),
                           torch.Size([3, shape[0] // 3, *shape[1:]]))
        return None if inner is None else inner.reshape(shape)
    if key.endswith("token_embedding.weight") and source.shape[0] != shape[0]:
        return None  # another vocabulary: rows would name other words
    if key.endswith("visual.positional_embedding") and source.shape[0] != shape[0]:
        resampled = _resample_positions(source, shape[0])
        return None if resampled is None else fit_tensor("", resampled, shape)
    if source.ndim == 4 and source.shape[2:] != shape[2:]:
        return None  # a patch kernel of another size
    if any(s > t for s, t in zip(shape, source.shape)):
        return None
    return source[tuple(slice(0, s) for s in shape)]


def inherit_weights(student: nn.Module, teacher: nn.Module, *, skip_prefixes: tuple[str, ...] = ()) -> dict:
    """Copy ``teacher``'s weights into ``student`` (both open_clip models, or their vlkd wrappers) as the module
    docstring describes; returns a report: tensors copied whole, cut, left out, and the layer maps."""
    student = getattr(student, "clip", student)
    teacher = getattr(teacher, "model", teacher)
    if not hasattr(teacher, "visual"):
        raise RecipeError("inherit needs an open_clip teacher (its weights are mapped by open_clip's names); "
                          "set method.inherit: false for a transformers teacher")
    source = teacher.state_dict()
    target = student.state_dict()
    student_depths, teacher_depths = _depths(target), _depths(source)
    maps = {prefix: layer_map(depth, teacher_depths[prefix])
            for prefix, depth in student_depths.items() if prefix in teacher_depths}
    report: dict[str, Any] = {"copied": 0, "cut": 0, "left_out": [], "layers": maps}
    updates = {}
    for key, value in target.items():
        if key.startswith(skip_prefixes):
            continue
        match = _BLOCK.match(key)
        teacher_key = key
        if match and match[1] in maps:
            teacher_key = f"{match[1]}.{maps[match[1]][int(match[2])]}.{match[3]}"
        fitted = fit_tensor(key, source[teacher_key], value.shape) if teacher_key in source else None
        if fitted is None:
            report["left_out"].append(key)
            continue
        report["copied" if fitted.shape == source[teacher_key].shape else "cut"] += 1
        updates[key] = fitted.to(value.dtype)
    student.load_state_dict(updates, strict=False)
    return report
