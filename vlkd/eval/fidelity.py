"""Prompt fidelity of text-to-image models on ``shapes`` captions.

Images generated for the ``shapes`` test captions are classified zero-shot by a CLIP judge (by default the shipped
shapes CLIP teacher, 99.95% / 100% top-1 on real test images for shape / colour) once for the shape and once for
the colour, each with the dataset's own prompt templates. An image is faithful when both match its caption.
Image ``i`` belongs to caption ``i``: the judge reads the images in the order the source yields them, which for a
pipeline source is the order of its prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlkd.errors import EvalError

# The fixed test split at the shipped teachers' resolution; the judge resizes whatever it is given.
SHAPES_TEST = "shapes:32"


def default_judge() -> str:
    """The shipped shapes CLIP teacher, as a ``load_clip`` spec."""
    from vlkd.data.assets import assets_dir

    return f"local-dir:{assets_dir() / 'teachers' / 'clip-shapes'}"


def load_judge(judge: Any = None) -> Any:
    """The judge as a loaded ClipAdapter: one given, a ``load_clip`` spec, or None for the shipped shapes CLIP."""
    from vlkd.eval.zeroshot import ClipAdapter, load_clip

    return judge if isinstance(judge, ClipAdapter) else load_clip(judge or default_judge())


@dataclass(frozen=True)
class ShapesPrompts:
    """The first ``len(captions)`` test captions of ``shapes`` with the shape and colour each one names."""

    captions: list[str]
    shapes: torch.Tensor
    colors: torch.Tensor


def shapes_prompts(num: int) -> ShapesPrompts:
    """Captions and labels of the first ``num`` of the 2,000 ``shapes`` test images."""
    from vlkd.data.builtin_shapes import TEST_COUNT, shapes_test_set

    if not 1 <= num <= TEST_COUNT:
        raise EvalError(f"prompt fidelity uses the {TEST_COUNT} shapes test captions; pass --num between 1 and {TEST_COUNT}, not {num}")
    test = shapes_test_set(32)
    return ShapesPrompts(test.captions[:num], test.labels[:num, 0].clone(), test.labels[:num, 1].clone())


# The shapes train stream the shipped teachers never drew from (they train on stream 0): sampling settings are
# chosen on it, so that the test captions and images only ever measure.
VALIDATION_STREAM = 1


def shapes_validation(num: int, reference: int | None = None) -> tuple[ShapesPrompts, Any]:
    """A validation split shaped like the test one: the captions and labels of the first ``num`` of ``reference``
    (default: as many as the test split holds) images drawn from shapes train stream ``VALIDATION_STREAM``, and those
    images as the FID reference (a DatasetSource)."""
    from vlkd.data import build_dataset
    from vlkd.data.builtin_shapes import TEST_COUNT
    from vlkd.eval.sources import DatasetSource

    reference = reference or TEST_COUNT
    if not 1 <= num <= reference:
        raise EvalError(f"the validation split draws {reference} images; pass --num between 1 and {reference}, "
                        f"not {num}")
    stream = build_dataset(SHAPES_TEST, "train", seed=VALIDATION_STREAM)
    samples = [stream[i] for i in range(num)]
    prompts = ShapesPrompts([s["caption"] for s in samples], torch.tensor([s["shape"] for s in samples]),
                            torch.tensor([s["color"] for s in samples]))
    return prompts, DatasetSource(stream, num=reference)


@torch.inference_mode()
def prompt_fidelity(images: Any, prompts: ShapesPrompts, judge: Any = None, *, batch_size: int = 250,
                    progress: bool = False) -> dict[str, Any]:
    """Fraction of images whose judged shape and colour both match their caption, and each alone.

    ``images``: anything ``vlkd.eval.sources.open_source`` reads (a pipeline source built with
    ``prompts.captions``, a tensor, ``shapes:32@test``), in caption order. ``judge``: a ClipAdapter or a
    ``load_clip`` spec (default: the shipped shapes CLIP teacher).
    """
    from tqdm.auto import tqdm

    from vlkd.data import build_dataset
    from vlkd.eval.sources import open_source
    from vlkd.eval.zeroshot import resolve_templates, zero_shot_classifier

    clip = load_judge(judge)
    source = open_source(images, num=len(prompts.captions))
    if source.count() != len(prompts.captions):
        raise EvalError(f"{source.count()} images for {len(prompts.captions)} captions; generate one image per caption")
    dataset = build_dataset(SHAPES_TEST, "test")
    classifiers = {task: zero_shot_classifier(clip, dataset.tasks[task], resolve_templates(None, dataset, task))
                   for task in ("shape", "color")}
    predicted: dict[str, list[torch.Tensor]] = {"shape": [], "color": []}
    batches = tqdm(source.batches(batch_size), desc="judging prompt fidelity", unit="batch", disable=not progress,
                   total=-(-source.count() // batch_size))
    for batch in batches:
        features = F.normalize(clip.encode_image(clip.preprocess(batch)).float(), dim=-1)
        for task, classifier in classifiers.items():
            predicted[task].append((features @ classifier).argmax(-1).cpu())
    shape_ok = torch.cat(predicted["shape"]) == prompts.shapes
    color_ok = torch.cat(predicted["color"]) == prompts.colors
    return {
        "fidelity": float((shape_ok & color_ok).float().mean()),
        "shape_accuracy": float(shape_ok.float().mean()),
        "color_accuracy": float(color_ok.float().mean()),
        "num_images": int(shape_ok.numel()),
        "seconds_per_image": getattr(source, "seconds_per_image", None),
    }
