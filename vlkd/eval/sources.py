"""Where evaluated images come from: folders, tensors, built-in datasets and diffusers pipelines.

Every source yields uint8 NCHW batches. Float images are quantised to uint8 by one rule, ``quantize_images``,
whether they are real or generated, so FID never compares a rounded set with an unrounded one.

Dataset specs take an optional split after ``@``: ``digits:16@all``, ``shapes:32@test`` (default ``train``
for FID references, ``test`` for zero-shot), and zero-shot specs an optional task after the last colon:
``shapes:32:color@test``.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from vlkd.errors import DataError, EvalError, ModelLoadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Datasets that vlkd generates itself: their pixels never change, so their statistics can be cached.
BUILTIN_DATASETS = ("digits", "shapes")


def quantize_images(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Images as uint8, the way stored images are: floats map ``value_range`` onto 0..255, then round and clamp.

    For [-1, 1] this is ``((x + 1) * 127.5).round().clamp(0, 255)``; for [0, 1] (diffusers' outputs) it is
    ``(x * 255).round().clamp(0, 255)``. uint8 input is returned unchanged.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise EvalError(f"images must be uint8 or floating point, not {images.dtype}; convert them before evaluating")
    low, high = value_range
    scaled = (images.float() - low) * (255.0 / (high - low))
    return scaled.round_().clamp_(0, 255).to(torch.uint8)


def _check_nchw(images: torch.Tensor, where: str) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise EvalError(f"{where} must be NCHW with 1 or 3 channels, got shape {tuple(images.shape)}; add or move the channel axis")
    return images


class ImageSource(ABC):
    """A finite stream of uint8 NCHW image batches."""

    name: str = "images"

    def count(self) -> int | None:
        """How many images the source holds, when known before reading them."""
        return None

    @abstractmethod
    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield uint8 NCHW batches of at most ``batch_size`` images."""


class TensorSource(ImageSource):
    """Images already in memory: one NCHW tensor or an iterable of NCHW batches, uint8 or float in ``value_range``."""

    def __init__(self, images: torch.Tensor | Iterable[torch.Tensor], value_range: tuple[float, float] = (-1.0, 1.0),
                 name: str = "tensor") -> None:
        self.images = images
        self.value_range = value_range
        self.name = name

    def count(self) -> int | None:
        return len(self.images) if isinstance(self.images, torch.Tensor) else None

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        chunks = [self.images] if isinstance(self.images, torch.Tensor) else self.images
        for chunk in chunks:
            chunk = quantize_images(_check_nchw(chunk, self.name), self.value_range)
            yield from chunk.split(batch_size)


class FolderSource(ImageSource):
    """PNG/JPEG files under a folder (recursively, in sorted order), converted to RGB as PIL decodes them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"image folder {self.folder} does not exist; pass a folder of PNG/JPEG files")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"image folder {self.folder} holds no {'/'.join(IMAGE_SUFFIXES)} files; point to a folder of images")
        self.name = str(self.folder)

    def count(self) -> int:
        return len(self.files)

    def _read(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read image {path}: {reason}; replace or remove that file") from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        for path in self.files:
            image = self._read(path)
            # Images of different sizes cannot share a batch; the extractor resizes each batch anyway.
            if pending and (len(pending) == batch_size or pending[0].shape != image.shape):
                yield torch.stack(pending)
                pending = []
            pending.append(image)
        if pending:
            yield torch.stack(pending)


def parse_dataset_spec(text: str, default_split: str) -> tuple[str, str]:
    """``"digits:16@all"`` -> ``("digits:16", "all")``; without ``@SPLIT`` the split is ``default_split``."""
    spec, at, split = text.rpartition("@")
    if at and split.isidentifier() and spec:
        return spec, split
    return text, default_split


def is_builtin_spec(spec: str) -> bool:
    """Whether a dataset spec names a dataset vlkd generates (digits, shapes), whose statistics may be cached."""
    return spec.partition(":")[0] in BUILTIN_DATASETS


class DatasetSource(ImageSource):
    """A ``vlkd.data`` dataset (``digits:16@all``, ``shapes:32@test``, ...) or any dataset of such dict samples."""

    def __init__(self, dataset: str | Any, split: str = "train", num: int | None = None) -> None:
        from vlkd.data import build_dataset

        if isinstance(dataset, str):
            spec, split = parse_dataset_spec(dataset, split)
            dataset = build_dataset(spec, split)
        self.dataset = dataset
        self.spec = getattr(dataset, "spec", type(dataset).__name__)
        self.split = getattr(dataset, "split", split)
        if num is None and getattr(dataset, "unlimited", False):
            raise EvalError(f"split {self.split!r} of {self.spec!r} is unlimited; pass a sample count (--num N)")
        self.length = len(dataset) if num is None else min(num, len(dataset))
        self.name = f"{self.spec}@{self.split}"

    def count(self) -> int:
        return self.length

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        from vlkd.data import collate

        for start in range(0, self.length, batch_size):
            samples = [self.dataset[i] for i in range(start, min(start + batch_size, self.length))]
            yield quantize_images(collate(samples)["pixel_values"], (-1.0, 1.0))


class PipelineSource(ImageSource):
    """Images sampled from a diffusers pipeline (a folder or a built pipeline), with the time it took.

    ``scheduler`` replaces the pipeline's scheduler for this source only (e.g.
    ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``). ``prompts`` makes it text-to-image: image
    ``i`` uses ``prompts[i % len(prompts)]``. Batch ``i`` is drawn by a CPU generator seeded with
    ``batch_seeds(seed, ...)[i]``, so two models sampled with the same seed and batch size start every batch from
    the same noise, whatever extra noise their samplers draw. ``seconds_per_image`` is the sampling time alone.
    """

    def __init__(self, pipeline: str | Path | Any, num_images: int, *, steps: int | None = None, seed: int = 0,
                 scheduler: Any = None, prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> None:
        if num_images < 1:
            raise EvalError(f"a pipeline source needs a sample count of at least 1, not {num_images}; pass --num N")
        self.pipeline = _load_pipeline(pipeline) if isinstance(pipeline, (str, Path)) else pipeline
        if scheduler is not None:
            # A new pipeline object sharing the modules, so the caller's pipeline keeps its own scheduler.
            self.pipeline = type(self.pipeline)(**{**self.pipeline.components, "scheduler": scheduler})
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.num_images = num_images
        self.steps = steps
        self.seed = seed
        self.prompts = list(prompts) if prompts is not None else None
        self.guidance_scale = guidance_scale
        self.progress = progress
        self.sampling_seconds = 0.0
        self.sampled = 0
        where = str(pipeline) if isinstance(pipeline, (str, Path)) else type(self.pipeline).__name__
        self.name = f"{where} ({steps if steps is not None else 'default'} steps)"

    def count(self) -> int:
        return self.num_images

    @property
    def seconds_per_image(self) -> float | None:
        """Wall-clock sampling seconds per image over everything sampled so far (None before sampling)."""
        return self.sampling_seconds / self.sampled if self.sampled else None

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        from tqdm.auto import tqdm

        from vlkd.diffusion.sample import sample_images

        starts = zip(range(0, self.num_images, batch_size), batch_seeds(self.seed, self.num_images, batch_size))
        for start, seed in tqdm(list(starts), desc=f"sampling {self.name}", unit="batch", disable=not self.progress):
            size = min(batch_size, self.num_images - start)
            chunk = [self.prompts[i % len(self.prompts)] for i in range(start, start + size)] if self.prompts else None
            began = time.perf_counter()
            images = sample_images(self.pipeline, size, self.steps, seed=seed, prompts=chunk,
                                   guidance_scale=self.guidance_scale)
            # sample_images returns NHWC floats in [0, 1] already on the CPU, so the clock includes the sync.
            self.sampling_seconds += time.perf_counter() - began
            self.sampled += size
            yield quantize_images(torch.from_numpy(images).permute(0, 3, 1, 2), (0.0, 1.0))


def batch_seeds(seed: int, num_images: int, batch_size: int) -> list[int]:
    """The generator seed of each batch of a PipelineSource: ``seed`` plus the batch's index. A CPU generator, so
    the noise is the same on every device; sources whose lists overlap share those batches' images."""
    return [seed + index for index in range(-(-num_images // batch_size))]


def _load_pipeline(folder: str | Path) -> Any:
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json); pass an exported student folder")
    try:
        return DiffusionPipeline.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load the diffusers pipeline in {folder}: {reason}") from None


def open_source(source: Any, *, num: int | None = None, steps: int | None = None, seed: int = 0,
                device: str | torch.device | None = None, progress: bool = True) -> ImageSource:
    """Turn what a user names into an ImageSource.

    Accepted: an ImageSource; a uint8/float tensor or an iterable of tensors (floats in [-1, 1]); a diffusers
    pipeline folder (``model_index.json``; needs ``num``) or pipeline object; a folder of PNG/JPEG files; a dataset
    spec such as ``digits:16@all``; a ``vlkd.data`` dataset object.
    """
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, torch.Tensor):
        return TensorSource(source)
    if hasattr(source, "components") and callable(source):
        return _pipeline_source(source, num, steps, seed, device, progress)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if (path / "model_index.json").is_file():
            return _pipeline_source(path, num, steps, seed, device, progress)
        if path.is_dir():
            return FolderSource(path)
        if isinstance(source, str) and ":" in source and not path.exists():
            return DatasetSource(source, num=num)
        raise DataError(f"{source} is neither a folder of images, a diffusers pipeline folder, nor a dataset spec like digits:16@all")
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return DatasetSource(source, num=num)
    if isinstance(source, Iterable):
        iterator = iter(source)
        first = next(iterator, None)
        if isinstance(first, torch.Tensor):
            return TensorSource(itertools.chain([first], iterator))
    raise EvalError(f"cannot read images from a {type(source).__name__}; pass a folder, tensor, dataset spec or pipeline")


def _pipeline_source(pipeline: Any, num: int | None, steps: int | None, seed: int,
                     device: str | torch.device | None, progress: bool) -> PipelineSource:
    if num is None:
        raise EvalError(f"sampling from the pipeline {pipeline} needs a sample count; pass --num N (e.g. 10000)")
    return PipelineSource(pipeline, num, steps=steps, seed=seed, device=device, progress=progress)
