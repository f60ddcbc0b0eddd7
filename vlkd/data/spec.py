"""Dataset specs (``digits:16``, ``shapes:64``, ``imagefolder:PATH``, ...) -> dataset objects."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from vlkd.data.base import VlkdDataset
from vlkd.data.builtin_digits import build_digits
from vlkd.data.builtin_shapes import build_shapes
from vlkd.data.folders import build_csv, build_imagefolder
from vlkd.data.hf import build_hf
from vlkd.data.wds import build_wds
from vlkd.errors import DataError

# prefix -> builder(spec, text after the colon, split, seed, **options)
DATASET_BUILDERS: dict[str, Callable[..., VlkdDataset]] = {
    "digits": build_digits,
    "shapes": build_shapes,
    "imagefolder": build_imagefolder,
    "csv": build_csv,
    "hf": build_hf,
    "wds": build_wds,
}


def _builder_and_argument(spec: str) -> tuple[Callable[..., VlkdDataset], str]:
    if not isinstance(spec, str):
        raise DataError(f"dataset spec must be a string such as 'digits:16', not {spec!r}")
    prefix, _, argument = spec.partition(":")
    if prefix not in DATASET_BUILDERS:
        raise DataError(
            f"unknown dataset spec {spec!r}; it must start with one of: {', '.join(p + ':' for p in DATASET_BUILDERS)}"
        )
    return DATASET_BUILDERS[prefix], argument


def _check_options(spec: str, builder: Callable[..., VlkdDataset], options: dict[str, Any]) -> None:
    accepted = [name for name, p in inspect.signature(builder).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(
            f"dataset {spec!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(accepted) or 'none'}"
        )


def build_dataset(
    spec: str, split: str = "train", *, seed: int | None = None, verify: bool = True, **options: Any
) -> VlkdDataset:
    """Build the dataset a spec names. ``seed`` picks the shapes train stream (default 0); test splits are fixed.
    ``verify`` opens every image file of a file dataset now, so a bad file fails here and not mid-training."""
    builder, argument = _builder_and_argument(spec)
    _check_options(spec, builder, options)
    dataset = builder(spec, argument, split, seed, **options)
    if verify:
        dataset.verify()
    return dataset


def dataset_info(spec: str, split: str = "train", **options: Any) -> dict[str, Any]:
    """Tasks, templates, image size and channels of a dataset, without decoding any pixels."""
    return build_dataset(spec, split, verify=False, **options).info()
