"""``shapes[:SIZE]``: procedurally drawn coloured shapes with captions, a pure function of (split, seed, index)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlkd.data.assets import load_asset_json
from vlkd.data.base import VlkdDataset, check_split, resolve_size
from vlkd.data.shape_outlines import MAX_EXTENT, UNIT_OUTLINES
from vlkd.errors import DataError

SHAPES_SPLITS = ("train", "test")
DEFAULT_SIZE = 32
# Train data is drawn on the fly: a virtual length large enough that no run exhausts it.
TRAIN_LENGTH = 2**31 - 1
TEST_COUNT = 2000
# First entropy word of each split's random stream: different words give disjoint streams.
SPLIT_STREAMS = {"train": 0, "test": 1}
# The test split never depends on the caller's seed, so every run is evaluated on the same images.
TEST_SEED = 0
# Polygons are drawn this many times larger and box-reduced: PIL's polygon fill has no anti-aliasing.
SUPERSAMPLE = 4
# The background is white minus up to this much per channel: a light tint that leaves every colour distinct.
MAX_TINT = 48
# A shape's centre is drawn from the middle of its grid cell, so neighbouring position words never overlap.
JITTER_RANGE = (0.2, 0.8)


@dataclass(frozen=True)
class ShapesVocabulary:
    """The words and colours of ``assets/datasets/shapes.json``, in label order."""

    shapes: list[str]
    colors: list[str]
    color_rgb: list[tuple[int, int, int]]
    sizes: list[str]
    size_radius: list[float]
    positions: list[str]
    caption: str
    default_task: str
    templates: dict[str, list[str]]

    def tasks(self) -> dict[str, list[str]]:
        """Class names per task; ``shape_color`` index = shape * len(colors) + color."""
        return {
            "shape_color": [f"{color} {shape}" for shape in self.shapes for color in self.colors],
            "shape": list(self.shapes),
            "color": list(self.colors),
        }


@lru_cache(maxsize=1)
def shapes_vocabulary() -> ShapesVocabulary:
    """Read the shapes vocabulary from the assets, checking that every shape name can be drawn."""
    assets = load_asset_json("datasets/shapes.json")
    unknown = [name for name in assets["shapes"] if name not in UNIT_OUTLINES]
    if unknown:
        raise DataError(
            f"assets/datasets/shapes.json names shapes {unknown} that vlkd cannot draw; "
            f"use some of {sorted(UNIT_OUTLINES)}"
        )
    return ShapesVocabulary(
        shapes=list(assets["shapes"]),
        colors=[color["name"] for color in assets["colors"]],
        color_rgb=[tuple(color["rgb"]) for color in assets["colors"]],
        sizes=list(assets["sizes"]),
        size_radius=list(assets["sizes"].values()),
        positions=list(assets["positions"]),
        caption=assets["caption"],
        default_task=assets["default_task"],
        templates=assets["templates"],
    )


@dataclass(frozen=True)
class ShapeSample:
    """One drawn image (H, W, 3 uint8) and what it shows."""

    pixels: np.ndarray
    shape: int
    color: int
    size: int
    position: int
    caption: str


def draw_shape_sample(vocab: ShapesVocabulary, image_size: int, stream: int, seed: int, index: int) -> ShapeSample:
    """Draw sample ``index`` of a stream; the result depends on nothing but the arguments."""
    rng = np.random.default_rng([stream, seed, index])
    shape, color, size, position = (
        int(value)
        for value in rng.integers(0, [len(vocab.shapes), len(vocab.colors), len(vocab.sizes), len(vocab.positions)])
    )
    jitter = rng.uniform(*JITTER_RANGE, size=2)
    background = tuple(int(value) for value in 255 - rng.integers(0, MAX_TINT, size=3))

    canvas_size = image_size * SUPERSAMPLE
    radius = vocab.size_radius[size] * canvas_size
    # Centres range over the part of the canvas where the whole shape fits; that range is cut into a 3x3 grid.
    margin = radius * MAX_EXTENT + SUPERSAMPLE
    cell = (canvas_size - 2 * margin) / 3
    row, column = divmod(position, 3)
    centre = np.array([margin + (column + jitter[0]) * cell, margin + (row + jitter[1]) * cell])

    image = Image.new("RGB", (canvas_size, canvas_size), background)
    outline = UNIT_OUTLINES[vocab.shapes[shape]] * radius + centre
    ImageDraw.Draw(image).polygon(outline.ravel().tolist(), fill=vocab.color_rgb[color])
    caption = vocab.caption.format(
        size=vocab.sizes[size], color=vocab.colors[color], shape=vocab.shapes[shape], position=vocab.positions[position]
    )
    return ShapeSample(np.array(image.reduce(SUPERSAMPLE)), shape, color, size, position, caption)


def _uint8_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (..., C, H, W) float32 in [-1, 1]."""
    return pixels.movedim(-1, -3).float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class ShapesTestSet:
    """The fixed test split, drawn once: (N, H, W, 3) uint8 pixels, (N, 3) int64 shape/color/shape_color, captions."""

    pixels: torch.Tensor
    labels: torch.Tensor
    captions: list[str]


@lru_cache(maxsize=2)
def shapes_test_set(image_size: int) -> ShapesTestSet:
    """Draw the 2,000 test images for a size (about a second at 32 px), cached for the process."""
    vocab = shapes_vocabulary()
    samples = [draw_shape_sample(vocab, image_size, SPLIT_STREAMS["test"], TEST_SEED, i) for i in range(TEST_COUNT)]
    labels = [(s.shape, s.color, s.shape * len(vocab.colors) + s.color) for s in samples]
    return ShapesTestSet(
        pixels=torch.from_numpy(np.stack([s.pixels for s in samples])),
        labels=torch.tensor(labels, dtype=torch.int64),
        captions=[s.caption for s in samples],
    )


class ShapesDataset(VlkdDataset):
    """RGB shapes with ``caption``, ``label`` (= ``shape_color``) and ``shape`` / ``color`` / ``shape_color`` ints."""

    def __init__(self, spec: str, split: str, image_size: int, seed: int) -> None:
        self.vocab = shapes_vocabulary()
        super().__init__(
            spec=spec,
            split=split,
            image_size=image_size,
            channels=3,
            tasks=self.vocab.tasks(),
            default_task=self.vocab.default_task,
            task_templates=self.vocab.templates,
        )
        self.seed = seed
        self.unlimited = split == "train"

    def __len__(self) -> int:
        return TRAIN_LENGTH if self.unlimited else TEST_COUNT

    def __getitem__(self, index: int) -> dict:
        index = self._checked_index(index)
        if self.unlimited:
            sample = draw_shape_sample(self.vocab, self.image_size, SPLIT_STREAMS["train"], self.seed, index)
            pixels = torch.from_numpy(sample.pixels)
            shape, color, caption = sample.shape, sample.color, sample.caption
        else:
            test_set = shapes_test_set(self.image_size)
            pixels = test_set.pixels[index]
            shape, color = (int(value) for value in test_set.labels[index, :2])
            caption = test_set.captions[index]
        shape_color = shape * len(self.vocab.colors) + color
        return {
            "pixel_values": _uint8_to_unit_range(pixels),
            "label": shape_color,
            "caption": caption,
            "shape": shape,
            "color": color,
            "shape_color": shape_color,
        }


def build_shapes(
    spec: str, size_text: str, split: str, seed: int | None, *, image_size: int | None = None
) -> ShapesDataset:
    """Build ``shapes[:SIZE]``; ``seed`` (default 0) picks the train stream, the test split is fixed."""
    check_split(spec, split, SHAPES_SPLITS)
    size = resolve_size(spec, size_text, image_size, DEFAULT_SIZE, minimum=16, maximum=1024)
    return ShapesDataset(spec, split, size, 0 if seed is None else seed)
