"""Zero-shot classification accuracy of CLIP models, measured the way open_clip and clip_benchmark measure it.

The classifier is built per class from every template: encode, L2-normalise, average over templates, normalise
again. Logits are 100 x cosine. Top-5 is reported only with at least 5 classes; mean per-class recall is
balanced accuracy. ``ClipAdapter`` gives open_clip and transformers CLIP models one interface.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from vlkd.errors import MODEL_LOAD_ERRORS, DataError, EvalError, ModelLoadError, load_failure
from vlkd.eval.sources import parse_dataset_spec

Template = str | Callable[[str], str]
# Classes encoded per text forward pass, as open_clip's build_zero_shot_classifier does by default.
CLASSES_PER_BATCH = 10


@dataclasses.dataclass
class ClipAdapter:
    """One interface over an open_clip CLIP or a transformers CLIPModel, with the model's own preprocessing."""

    model: torch.nn.Module
    tokenizer: Callable[..., Any] | None
    family: str  # "open_clip" or "transformers"
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    files: tuple[Path, ...] = ()  # config and weight files it was loaded from, which key feature caches

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> Any:
        """Token ids (open_clip) or a BatchEncoding (transformers) on the model's device."""
        if self.tokenizer is None:
            raise EvalError("a transformers CLIPModel needs its tokenizer for text; pass tokenizer=CLIPTokenizer.from_pretrained(folder)")
        if self.family == "transformers":
            max_length = self.model.config.text_config.max_position_embeddings
            return self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(self.device)
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, tokens: Any) -> torch.Tensor:
        """Text embeddings, not normalised."""
        if self.family == "transformers":
            return _pooled(self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
        return self.model.encode_text(tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings of preprocessed pixels, not normalised."""
        if self.family == "transformers":
            return _pooled(self.model.get_image_features(pixel_values=pixels))
        return self.model.encode_image(pixels)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [-1, 1] float NCHW -> normalised model input: resize (shorter side, or both sides for
        ``squash``), centre crop, clamp to [0, 1] as a uint8 PIL image would be, then mean/std."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else (x.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mode = InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC
        height, width = self.image_size
        if tuple(x.shape[-2:]) != (height, width):
            size = [height, width] if self.resize_mode == "squash" else [min(height, width)]
            x = TF.center_crop(TF.resize(x, size, interpolation=mode, antialias=True), [height, width])
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return ((x.clamp(0.0, 1.0) - mean) / std).to(next(self.model.parameters()).dtype)


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns the projected embedding as ``pooler_output``; 4.x returned the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def use_attention_if_available(model: torch.nn.Module, backend: str | None) -> None:
    """Swap in vlkd's attention kernels (outputs equal within float tolerance); None leaves the model as it is."""
    if backend is None:
        return
    try:
        from vlkd.kernels import use_attention
    except ImportError:  # the kernels module is optional at this layer
        return
    use_attention(model, backend=backend, strict=False)  # a model without attention layers keeps its own code


def as_clip(model: Any, tokenizer: Callable[..., Any] | None = None, *, image_mean: Sequence[float] | None = None,
            image_std: Sequence[float] | None = None) -> ClipAdapter:
    """Wrap a built model: a transformers CLIPModel (``tokenizer`` needed for text) or an open_clip model
    (``tokenizer`` defaults to open_clip's SimpleTokenizer at the model's context length)."""
    import open_clip

    if isinstance(model, ClipAdapter):
        return model
    if hasattr(model, "get_image_features"):
        vision = model.config.vision_config
        return ClipAdapter(model, tokenizer, "transformers", _pair(vision.image_size),
                           tuple(image_mean or open_clip.OPENAI_DATASET_MEAN), tuple(image_std or open_clip.OPENAI_DATASET_STD))
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise EvalError(f"{type(model).__name__} is not a CLIP model; pass an open_clip model or a transformers CLIPModel")
    config = open_clip.get_model_preprocess_cfg(model)
    if tokenizer is None:
        tokenizer = open_clip.SimpleTokenizer(context_length=getattr(model, "context_length", None) or 77)
    return ClipAdapter(
        model, tokenizer, "open_clip", _pair(config.get("size", 224)),
        tuple(image_mean or config.get("mean") or open_clip.OPENAI_DATASET_MEAN),
        tuple(image_std or config.get("std") or open_clip.OPENAI_DATASET_STD),
        interpolation=config.get("interpolation", "bicubic"), resize_mode=config.get("resize_mode", "shortest"),
    )


def _load_transformers_clip(folder: Path) -> ClipAdapter:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mean = std = None
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(folder)
        mean, std = processor.image_mean, processor.image_std
    clip = as_clip(model, tokenizer, image_mean=mean, image_std=std)
    clip.files = tuple(sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin")))
    return clip


def _load_open_clip(spec: str) -> ClipAdapter:
    import open_clip

    if spec.startswith(("local-dir:", "hf-hub:")):
        name, pretrained = spec, None
    else:
        name, _, pretrained = spec.partition(":")
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
    clip = as_clip(model, open_clip.get_tokenizer(name))
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:"):])
        clip.files = tuple(sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".pth")))
    return clip


def load_clip(spec: str, *, device: str | torch.device | None = None, attention_backend: str | None = "auto") -> ClipAdapter:
    """Load a CLIP model from ``local-dir:PATH`` or an open_clip folder, a transformers CLIPModel folder, or an
    open_clip ``name:pretrained`` (``ViT-B-32:openai``), in eval mode on ``device`` (default: CUDA if present)."""
    path = Path(spec)
    try:
        if path.is_dir() and (path / "open_clip_config.json").is_file():
            clip = _load_open_clip(f"local-dir:{path}")
        elif path.is_dir() and (path / "config.json").is_file():
            if json.loads((path / "config.json").read_text()).get("model_type") != "clip":
                raise ModelLoadError(f"{path}/config.json is not a transformers CLIPModel config; pass a CLIP folder")
            clip = _load_transformers_clip(path)
        elif path.is_dir():
            raise ModelLoadError(f"{path} holds neither open_clip_config.json nor a transformers config.json; pass a CLIP model folder")
        else:
            clip = _load_open_clip(spec)
    except MODEL_LOAD_ERRORS as exc:
        reason = load_failure(exc)
        raise ModelLoadError(f"cannot load CLIP model {spec!r}: {reason}") from None
    clip.model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))).eval()
    use_attention_if_available(clip.model, attention_backend)
    return clip


def resolve_templates(templates: str | Sequence[Template] | None, dataset: Any, task: str) -> list[Template]:
    """``"openai"`` / ``"simple"`` (open_clip's ImageNet templates), a list, or None: the dataset's own templates for
    the task, else open_clip's OpenAI ImageNet templates."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    named = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if templates == "dataset":
        templates = None
    if isinstance(templates, str):
        if templates not in named:
            raise EvalError(f"unknown templates {templates!r}; use 'openai', 'simple', 'dataset' or a list of strings with {{c}}")
        return list(named[templates])
    if templates is None:
        own = (getattr(dataset, "task_templates", None) or {}).get(task)
        if own is None and task == getattr(dataset, "default_task", None):
            own = getattr(dataset, "templates", None)  # datasets that know templates for their default task only
        templates = own or OPENAI_IMAGENET_TEMPLATES
    if not templates:
        raise EvalError("zero-shot classification needs at least one template; pass templates such as ['a photo of a {c}.']")
    return list(templates)


def fill_template(template: Template, classname: str) -> str:
    """A prompt: a callable template called with the class name, or a string with ``{c}`` (vlkd's assets,
    clip_benchmark) or ``{}`` (open_clip's format strings) filled in."""
    return template(classname) if callable(template) else template.format(classname, c=classname)


@torch.inference_mode()
def zero_shot_classifier(clip: ClipAdapter, classnames: Sequence[str], templates: Sequence[Template]) -> torch.Tensor:
    """(D, C) class weights: per class, the normalised mean of the normalised embeddings of all its templates."""
    weights = []
    for start in range(0, len(classnames), CLASSES_PER_BATCH):
        names = classnames[start:start + CLASSES_PER_BATCH]
        texts = [fill_template(t, c) for c in names for t in templates]
        embeddings = F.normalize(clip.encode_text(clip.tokenize(texts)).float(), dim=-1)
        weights.append(F.normalize(embeddings.reshape(len(names), len(templates), -1).mean(1), dim=-1))
    return torch.cat(weights).T


def _open_dataset(dataset: Any, split: str, task: str | None) -> tuple[Any, str]:
    """A dataset object and its task from an object or a ``SPEC[:TASK][@SPLIT]`` string."""
    from vlkd.data import build_dataset

    if isinstance(dataset, str):
        text, split = parse_dataset_spec(dataset, split)
        head, colon, tail = text.rpartition(":")
        if task is None and colon and head and tail.isidentifier():
            try:
                candidate = build_dataset(head, split)
            except DataError:
                candidate = None
            if candidate is not None and tail in candidate.tasks:
                return candidate, tail
        dataset = build_dataset(text, split)
    tasks = getattr(dataset, "tasks", {})
    task = task or getattr(dataset, "default_task", None)
    name = getattr(dataset, "spec", type(dataset).__name__)
    if task not in tasks:
        raise EvalError(f"dataset {name!r} has no task {task!r}; use one of: {', '.join(tasks) or 'none (it is unlabelled)'}")
    if len(tasks[task]) < 2:
        raise EvalError(f"task {task!r} of dataset {name!r} has {len(tasks[task])} class(es); zero-shot needs at least 2 classes")
    return dataset, task


def zero_shot(model: Any, dataset: Any, task: str | None = None, templates: str | Sequence[Template] | None = None, *,
              batch_size: int = 64, split: str = "test", num: int | None = None, tokenizer: Callable[..., Any] | None = None,
              attention_backend: str | None = "auto") -> dict[str, Any]:
    """Zero-shot top-1, top-5 (None below 5 classes) and mean per-class recall of a CLIP model on a labelled dataset.

    ``model``: a ClipAdapter, an open_clip / transformers CLIP model, or a spec for ``load_clip``. ``dataset``: a
    ``vlkd.data`` dataset or a spec ``SPEC[:TASK][@SPLIT]`` (split default ``test``). ``num`` limits the images.
    ``templates``: None or ``"dataset"`` (the task's own, from ``assets/`` for built-in datasets, else open_clip's
    OpenAI ImageNet set), ``"openai"`` / ``"simple"`` (open_clip's ImageNet sets), or a list (see fill_template).
    """
    from sklearn.metrics import balanced_accuracy_score
    from torch.utils.data import DataLoader

    from vlkd.data import collate

    if isinstance(model, str):
        clip = load_clip(model, attention_backend=attention_backend)
    else:
        clip = as_clip(model, tokenizer)
        use_attention_if_available(clip.model, attention_backend)
    dataset, task = _open_dataset(dataset, split, task)
    if num is None and getattr(dataset, "unlimited", False):
        raise EvalError(f"dataset {dataset.spec!r} split {dataset.split!r} is unlimited; pass num= or use the test split")
    if (num is not None and num < 1) or len(dataset) == 0:
        raise EvalError(f"zero-shot accuracy needs at least 1 image, got num={num} of {len(dataset)}; pass a positive --num")
    classnames = dataset.tasks[task]
    classifier = zero_shot_classifier(clip, classnames, resolve_templates(templates, dataset, task))
    images = dataset if num is None else torch.utils.data.Subset(dataset, range(min(num, len(dataset))))

    labels, predictions, top5_hits = [], [], []
    with torch.inference_mode():
        for batch in DataLoader(images, batch_size=batch_size, collate_fn=collate):
            if task not in batch and "label" not in batch:
                raise EvalError(f"samples carry no {task!r} or 'label' key; zero-shot needs labelled samples")
            target = torch.as_tensor(batch[task] if task in batch else batch["label"]).to(clip.device)
            features = F.normalize(clip.encode_image(clip.preprocess(batch["pixel_values"])).float(), dim=-1)
            logits = 100.0 * features @ classifier
            labels.append(target.cpu())
            predictions.append(logits.argmax(-1).cpu())
            if len(classnames) >= 5:
                top5_hits.append((logits.topk(5, dim=-1).indices == target[:, None]).any(-1).cpu())
    labels_all, predictions_all = torch.cat(labels), torch.cat(predictions)
    with warnings.catch_warnings():
        # Predicted classes that no image has are still wrong answers, counted against the true classes' recall;
        # sklearn's warning about them says nothing to act on.
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        recall = float(balanced_accuracy_score(labels_all.numpy(), predictions_all.numpy()))
    return {
        "top1": float((predictions_all == labels_all).float().mean()),
        "top5": float(torch.cat(top5_hits).float().mean()) if top5_hits else None,
        "mean_per_class_recall": recall,
        "num_classes": len(classnames),
        "num_images": len(labels_all),
        "task": task,
    }
