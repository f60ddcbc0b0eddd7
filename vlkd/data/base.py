"""The dataset base class: dict samples plus the metadata trainers and evaluators read."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from vlkd.errors import DataError


class VlkdDataset(Dataset):
    """A map-style dataset whose items are dicts with ``pixel_values`` (CHW float32 in [-1, 1]),
    ``label`` when labelled and ``caption`` when captioned."""

    unlimited: bool = False

    def __init__(
        self,
        *,
        spec: str,
        split: str,
        image_size: int,
        channels: int,
        tasks: dict[str, list[str]] | None = None,
        default_task: str | None = None,
        task_templates: dict[str, list[str]] | None = None,
    ) -> None:
        self.spec = spec
        self.split = split
        self.image_size = image_size
        self.channels = channels
        # Copies: the lists often come from cached assets, which a caller editing its dataset must not change.
        self.tasks = {task: list(names) for task, names in (tasks or {}).items()}
        self.default_task = default_task
        self.task_templates = {task: list(templates) for task, templates in (task_templates or {}).items()}

    @property
    def templates(self) -> list[str] | None:
        """Zero-shot prompt templates (``{c}`` = class name) for the default task, if any ship."""
        return self.task_templates.get(self.default_task) if self.default_task else None

    def verify(self) -> None:
        """Check that every item can be read; file datasets override this, generated data is always readable."""

    def info(self) -> dict[str, Any]:
        """The metadata as a plain dict (what ``dataset_info`` returns)."""
        return {
            "spec": self.spec,
            "split": self.split,
            "image_size": self.image_size,
            "channels": self.channels,
            "tasks": self.tasks,
            "default_task": self.default_task,
            "templates": self.templates,
            "task_templates": self.task_templates,
            "unlimited": self.unlimited,
            "length": len(self),
        }

    def _checked_index(self, index: int) -> int:
        """``index`` as a non-negative position; IndexError past the end ends plain iteration."""
        length = len(self)
        position = index + length if index < 0 else index
        if not 0 <= position < length:
            raise IndexError(f"index {index} is out of range for {self.spec!r} ({self.split}, {length} items)")
        return position

    def __len__(self) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def check_split(spec: str, split: str, allowed: tuple[str, ...]) -> str:
    """Return ``split`` if ``spec`` has it, else raise a DataError listing the ones it has."""
    if split not in allowed:
        raise DataError(f"unknown split {split!r} for dataset {spec!r}; use one of: {', '.join(allowed)}")
    return split


def parse_size(spec: str, text: str, minimum: int, maximum: int) -> int:
    """The ``SIZE`` in ``name:SIZE`` as an int within [minimum, maximum]."""
    name = spec.partition(":")[0]
    try:
        size = int(text)
    except ValueError:
        size = -1
    if not minimum <= size <= maximum:
        raise DataError(
            f"bad image size {text!r} in dataset spec {spec!r}; "
            f"use {name}:N with an integer N from {minimum} to {maximum}"
        )
    return size


def resolve_size(spec: str, size_text: str, image_size: int | None, default: int, minimum: int, maximum: int) -> int:
    """Combine a ``name:SIZE`` suffix with an ``image_size=`` option; they must agree when both are given."""
    if size_text:
        size = parse_size(spec, size_text, minimum, maximum)
        if image_size is not None and image_size != size:
            raise DataError(f"dataset spec {spec!r} asks for size {size} but image_size={image_size}; give only one")
        return size
    if image_size is None:
        return default
    return parse_size(spec, str(image_size), minimum, maximum)
