"""CLIP teachers and students for distillation: loading, building from open_clip configs, text-tower modes and
projection heads.

Teachers (``load_teacher``) are frozen and in eval mode here, in one place:
- ``local-dir:PATH``, or a folder holding ``open_clip_config.json``: an open_clip local dir;
- ``hf-hub:ORG/REPO``: an open_clip model on the Hugging Face hub;
- ``NAME:TAG`` (``ViT-B-32:openai``): an open_clip built-in architecture with a pretrained tag;
- ``transformers:ID``, a folder holding a CLIP ``config.json``, or a hub id ``ORG/NAME``: a transformers CLIPModel.

Students (``build_student``) are open_clip models from a built-in name, an inline config (``embed_dim``,
``vision_cfg``: ViT width/layers/head_width/patch_size, or ``timm_model_name`` for a timm image tower, ``text_cfg``),
or a name whose inline keys override parts of it. (open_clip builds a timm tower at the timm model's own input
size: a CNN reads any size, a timm ViT wants its default one.) Text-tower modes:
- ``train``: the student's own text tower and own tokenizer (from its ``text_cfg``), trained;
- ``shared-tokenizer``: the student's own text tower, trained, reading the teacher's tokenizer (its vocabulary,
  context length and pooling are the teacher's; width and depth are the student's);
- ``locked``: the teacher's text tower itself, frozen and shared; only the image tower learns to meet it. A
  tokenizer named in the student's config must be the teacher's.

Projection heads: FD and ICL compare student with teacher embeddings, so when their widths differ the student gets
bias-free linear heads (image, text) into the teacher's width. They serve only those losses and are dropped at
export: the student's own embedding (what the contrastive and affinity losses train and zero-shot reads) is its
projection's output. Locked mode needs none: a head after the student's linear image projection would be a second
linear map that folds into it, so that projection is built folded, straight at the teacher's width.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkd.clip.tokenizer import (
    TOKENIZER_KEYS,
    TextTokenizer,
    describe_tokenizer,
    open_clip_tokenizer,
    tokenizer_signature,
)
from vlkd.errors import MODEL_LOAD_ERRORS, ModelLoadError, RecipeError, load_failure
from vlkd.files import files_digest

TEXT_MODES = ("train", "locked", "shared-tokenizer")
# text_cfg keys saying how the tower finds its pooled token in the tokenizer's ids (shared along with it).
POOLING_KEYS = ("pad_id", "eos_id", "pool_type")
_MODEL_FILES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".model")
Outputs = dict[str, torch.Tensor]


@dataclass
class ClipStudentConfig:
    """The ``student`` section of a clip-distill recipe: an open_clip built-in ``model`` name, an inline config, or
    both (inline keys then override the built-in's, section by section)."""

    model: str | None = None
    embed_dim: int | None = None
    vision_cfg: dict[str, Any] = field(default_factory=dict)
    text_cfg: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool | None = None
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)  # default: the teacher's, at the student's size

    def __post_init__(self) -> None:
        if self.model is None and not self.vision_cfg:
            raise ValueError("name an open_clip model (student.model, e.g. ViT-S-32) or give an inline "
                             "student.vision_cfg and student.embed_dim")
        if self.model is None and self.embed_dim is None:
            raise ValueError("the inline student config has no embed_dim; add student.embed_dim (the width of the "
                             "joint image-text embedding)")


# ------------------------------------------------------------------------------------------------------ teachers


class ClipTeacher(nn.Module):
    """A CLIP teacher of either family behind one interface: ``forward(pixel_values, text)`` -> L2-normalised
    ``image_features`` / ``text_features`` and the exponentiated ``logit_scale``. Pixels are vlkd's [-1, 1]
    images, preprocessed here as the teacher's own preprocessing would."""

    def __init__(self, model: nn.Module, *, spec: str, family: str, tokenizer: TextTokenizer, identity: str,
                 model_cfg: dict | None, preprocess_cfg: dict):
        from vlkd.eval.zeroshot import as_clip

        super().__init__()
        self.model = model
        self.spec, self.family, self.tokenizer, self.identity = spec, family, tokenizer, identity
        self.model_cfg, self.preprocess_cfg = model_cfg, preprocess_cfg
        # The evaluation harness's adapter: training and zero-shot preprocess pixels the same way.
        self.adapter = as_clip(model, tokenizer.tokenizer, image_mean=preprocess_cfg["mean"],
                               image_std=preprocess_cfg["std"])
        if family == "transformers":  # the harness tokenizes with the transformers tokenizer itself
            self.adapter.tokenizer = tokenizer.tokenizer.tokenizer
        self.adapter.interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.adapter.resize_mode = preprocess_cfg.get("resize_mode", "shortest")

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding."""
        if self.family == "transformers":
            return int(self.model.config.projection_dim)
        return int(self.model_cfg["embed_dim"])

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings of [-1, 1] pixels."""
        return F.normalize(self.adapter.encode_image(self.adapter.preprocess(pixel_values)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings of token ids (padding after the end token needs no mask: the tower is causal)."""
        if self.family == "transformers":
            output = self.model.get_text_features(input_ids=tokens)
            features = output if isinstance(output, torch.Tensor) else output.pooler_output
        else:
            features = self.model.encode_text(tokens)
        return F.normalize(features, dim=-1)

    def forward(self, pixel_values: torch.Tensor, text: torch.Tensor | None = None) -> Outputs:
        outputs = {"image_features": self.encode_image(pixel_values), "logit_scale": self.model.logit_scale.exp()}
        if text is not None:
            outputs["text_features"] = self.encode_text(text)
        return outputs


def unknown_model_error(name: str, what: str = "open_clip model") -> ModelLoadError:
    """'unknown open_clip model X; close names: ...' (difflib over open_clip.list_models())."""
    import open_clip

    names = open_clip.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else "see open_clip.list_models()"
    return ModelLoadError(f"unknown {what} {name!r}; {hint}")


def parse_teacher_spec(spec: str) -> tuple[str, str, str | None]:
    """``(family, name, pretrained)``: family ``open_clip`` or ``transformers``; see the module docstring."""
    import open_clip

    if spec.startswith("transformers:"):
        return "transformers", spec[len("transformers:"):], None
    if spec.startswith(("local-dir:", "hf-hub:")):
        if spec.startswith("local-dir:") and not Path(spec[len("local-dir:"):]).is_dir():
            raise ModelLoadError(f"teacher {spec!r}: no such folder; give the path of an open_clip local dir")
        return "open_clip", spec, None
    path = Path(spec)
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "open_clip", f"local-dir:{path}", None
        if (path / "config.json").is_file():
            return "transformers", str(path), None
        raise ModelLoadError(f"teacher {spec!r} holds neither open_clip_config.json nor a transformers config.json")
    name, colon, tag = spec.partition(":")
    if colon:
        if name not in open_clip.list_models():
            raise unknown_model_error(name)
        if not tag:
            raise ModelLoadError(f"teacher {spec!r}: empty pretrained tag; use NAME:TAG, e.g. ViT-B-32:openai")
        return "open_clip", name, tag
    if name in open_clip.list_models():
        tags = ", ".join(t for m, t in open_clip.list_pretrained() if m == name) or "none"
        raise ModelLoadError(f"teacher {spec!r} needs a pretrained tag, as {name}:TAG (tags: {tags})")
    if "/" in name:
        return "transformers", name, None
    raise unknown_model_error(name)


def teacher_identity(family: str, name: str, pretrained: str | None) -> str:
    """A hash naming the teacher's weights: file contents for folders, name and tag (and library) for the hub."""
    import open_clip

    local = Path(name[len("local-dir:"):]) if name.startswith("local-dir:") else Path(name)
    if local.is_dir():
        files = [p for p in local.iterdir() if p.is_file() and p.suffix in _MODEL_FILES]
        return hashlib.sha256(f"{family}|{files_digest(files, local)}".encode()).hexdigest()[:16]
    return hashlib.sha256(f"{family}|{name}|{pretrained}|open_clip {open_clip.__version__}".encode()).hexdigest()[:16]


def load_teacher(spec: str, device: str | torch.device = "cpu") -> ClipTeacher:
    """Load a CLIP teacher (see the module docstring), frozen and in eval mode."""
    family, name, pretrained = parse_teacher_spec(spec)
    identity = teacher_identity(family, name, pretrained)
    try:
        if family == "transformers":
            teacher = _load_transformers(spec, name, identity)
        else:
            teacher = _load_open_clip(spec, name, pretrained, identity)
    except MODEL_LOAD_ERRORS as exc:
        reason = load_failure(exc)
        raise ModelLoadError(f"cannot load CLIP teacher {spec!r}: {reason}") from None
    return teacher.to(device).eval().requires_grad_(False)


def _load_open_clip(spec: str, name: str, pretrained: str | None, identity: str) -> ClipTeacher:
    import open_clip

    model = open_clip.create_model(name, pretrained=pretrained)
    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    folder = Path(name[len("local-dir:"):]) if name.startswith("local-dir:") else None
    tokenizer = open_clip_tokenizer(model_cfg.get("text_cfg", {}), folder)
    return ClipTeacher(model, spec=spec, family="open_clip", tokenizer=tokenizer, identity=identity,
                       model_cfg=model_cfg, preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)))


def _load_transformers(spec: str, name: str, identity: str) -> ClipTeacher:
    from open_clip.tokenizer import HFTokenizer
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(name)
    if model.config.model_type != "clip":
        raise ModelLoadError(f"teacher {spec!r} is a {model.config.model_type!r} model, not a transformers CLIPModel")
    vision, text = model.config.vision_config, model.config.text_config
    size = vision.image_size
    processor = CLIPImageProcessor.from_pretrained(name)
    preprocess_cfg = {"size": [size, size], "mean": list(processor.image_mean), "std": list(processor.image_std),
                      "interpolation": "bicubic" if processor.resample == 3 else "bilinear", "resize_mode": "shortest"}
    context = int(text.max_position_embeddings)
    folder = Path(name) if Path(name).is_dir() else None
    tokenizer = TextTokenizer(HFTokenizer(name, context_length=context), context, name, folder)
    return ClipTeacher(model, spec=spec, family="transformers", tokenizer=tokenizer, identity=identity, model_cfg=None,
                       preprocess_cfg=preprocess_cfg)


def teacher_text_cfg(teacher: ClipTeacher) -> dict:
    """The teacher's tokenizer as open_clip text_cfg keys (vocabulary, context, hf tokenizer, pooling)."""
    if teacher.family == "open_clip":
        text_cfg = teacher.model_cfg.get("text_cfg", {})
        keys = [k for k in TOKENIZER_KEYS + POOLING_KEYS if k in text_cfg]
        return {k: copy.deepcopy(text_cfg[k]) for k in keys}
    text = teacher.model.config.text_config
    hf = teacher.tokenizer.tokenizer.tokenizer
    # open_clip's argmax pooling finds the end token as the highest id; CLIP's BPE puts it last in the vocabulary.
    eos = int(hf.eos_token_id)
    pooling = {"pool_type": "argmax"} if eos == text.vocab_size - 1 else {"pool_type": "eos", "eos_id": eos}
    return {"context_length": int(text.max_position_embeddings), "vocab_size": int(text.vocab_size),
            "hf_tokenizer_name": teacher.tokenizer.name, **pooling}


# ------------------------------------------------------------------------------------------------------ students


class ClipStudent(nn.Module):
    """An open_clip model being distilled, plus what only training needs: linear heads into the teacher's
    embedding width (see the module docstring). ``forward`` adds ``*_distill_features`` (normalised, teacher
    width) to open_clip's outputs; without ``text`` it encodes images only."""

    def __init__(self, clip: nn.Module, *, model_cfg: dict, preprocess_cfg: dict, text_mode: str,
                 tokenizer: TextTokenizer, teacher_embed_dim: int | None = None):
        from vlkd.eval.zeroshot import as_clip

        super().__init__()
        self.clip = clip
        self.model_cfg, self.preprocess_cfg = model_cfg, preprocess_cfg
        self.text_mode, self.tokenizer = text_mode, tokenizer
        self.image_head = self.text_head = None
        width = int(model_cfg["embed_dim"])
        if teacher_embed_dim is not None and teacher_embed_dim != width:
            self.image_head = nn.Linear(width, teacher_embed_dim, bias=False)
            self.text_head = nn.Linear(width, teacher_embed_dim, bias=False)
        self.adapter = as_clip(clip, tokenizer.tokenizer)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The student's learned log temperature (capped by the method after each step)."""
        return self.clip.logit_scale

    def forward(self, pixel_values: torch.Tensor, text: torch.Tensor | None = None) -> Outputs:
        image = F.normalize(self.clip.encode_image(self.adapter.preprocess(pixel_values)), dim=-1)
        outputs = {"image_features": image, "logit_scale": self.clip.logit_scale.exp(),
                   "image_distill_features": _head(self.image_head, image)}
        if text is not None:
            features = F.normalize(self.clip.encode_text(text), dim=-1)
            outputs["text_features"] = features
            outputs["text_distill_features"] = _head(self.text_head, features)
        return outputs


def _head(head: nn.Module | None, features: torch.Tensor) -> torch.Tensor:
    return features if head is None else F.normalize(head(features), dim=-1)


def student_model_cfg(config: ClipStudentConfig, teacher: ClipTeacher, text_mode: str) -> dict:
    """The student's open_clip ``model_cfg``: built-in or inline, adjusted for the text mode."""
    import open_clip

    if text_mode not in TEXT_MODES:
        raise RecipeError(f"unknown text_mode {text_mode!r}; use one of: {', '.join(TEXT_MODES)}")
    cfg: dict[str, Any] = {}
    if config.model is not None:
        if config.model not in open_clip.list_models():
            raise unknown_model_error(config.model, "open_clip student model")
        cfg = copy.deepcopy(open_clip.get_model_config(config.model))
    if config.embed_dim is not None:
        cfg["embed_dim"] = config.embed_dim
    cfg["vision_cfg"] = {**cfg.get("vision_cfg", {}), **copy.deepcopy(config.vision_cfg)}
    cfg["text_cfg"] = {**cfg.get("text_cfg", {}), **copy.deepcopy(config.text_cfg)}
    if config.quick_gelu is not None:
        cfg["quick_gelu"] = config.quick_gelu
    if "embed_dim" not in cfg:
        raise RecipeError("the student config has no embed_dim; add student.embed_dim (the joint embedding width)")

    if text_mode == "locked":
        if teacher.family != "open_clip":
            raise RecipeError(f"text_mode locked shares the teacher's open_clip text tower; {teacher.spec!r} is a "
                              "transformers model: use text_mode shared-tokenizer or train")
        teacher_cfg = teacher.model_cfg
        # A built-in model implies its tokenizer; an inline text_cfg only the tokenizer keys it names.
        theirs = tokenizer_signature(teacher_cfg["text_cfg"])
        own = tokenizer_signature(cfg["text_cfg"]) if config.model is not None else {
            **theirs, **{k: v for k, v in config.text_cfg.items() if k in TOKENIZER_KEYS}}
        if own != theirs:
            raise RecipeError(f"text_mode locked: the student's tokenizer ({describe_tokenizer(own)}) differs "
                              f"from the teacher's ({describe_tokenizer(theirs)}); use text_mode shared-tokenizer")
        cfg["text_cfg"] = copy.deepcopy(teacher_cfg["text_cfg"])
        cfg["embed_dim"] = teacher_cfg["embed_dim"]  # the folded head: see the module docstring
        cfg["quick_gelu"] = teacher_cfg.get("quick_gelu", False)  # one flag for both towers in open_clip
        if teacher_cfg.get("custom_text"):
            cfg["custom_text"] = True
    elif text_mode == "shared-tokenizer":
        shared = teacher_text_cfg(teacher)
        for key in TOKENIZER_KEYS + POOLING_KEYS:
            cfg["text_cfg"].pop(key, None)
        cfg["text_cfg"].update(shared)
    elif not cfg["text_cfg"]:
        raise RecipeError("text_mode train needs the student's own text tower: give student.text_cfg or a "
                          "student.model, or use text_mode shared-tokenizer")
    return cfg


def instantiate_open_clip(model_cfg: dict) -> nn.Module:
    """An open_clip model from a ``model_cfg`` dict, with the class open_clip's factory would pick for it."""
    import open_clip

    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False  # never download base weights for a student
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    try:
        return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"the student config cannot build an open_clip model: {reason}") from None


def build_student(config: ClipStudentConfig, teacher: ClipTeacher, text_mode: str = "shared-tokenizer") -> ClipStudent:
    """A randomly initialised student for ``teacher`` (inherit weights afterwards with vlkd.clip.inherit)."""
    import open_clip

    model_cfg = student_model_cfg(config, teacher, text_mode)
    clip = instantiate_open_clip(model_cfg)
    size = clip.visual.image_size if hasattr(clip.visual, "image_size") else model_cfg["vision_cfg"].get("image_size")
    size = list(size) if isinstance(size, (tuple, list)) else [int(size), int(size)]
    preprocess_cfg = {**teacher.preprocess_cfg, "size": size, **config.preprocess_cfg}
    open_clip.set_model_preprocess_cfg(clip, preprocess_cfg)
    with torch.no_grad():  # start at the teacher's temperature: its similarities are what the student should match
        clip.logit_scale.fill_(float(teacher.model.logit_scale.detach().reshape(-1)[0]))
    if text_mode == "train":
        tokenizer = open_clip_tokenizer(model_cfg["text_cfg"])
    else:
        tokenizer = teacher.tokenizer
    if text_mode == "locked":
        _copy_text_tower(teacher.model, clip)
        clip.lock_text_tower()
    head_dim = None if text_mode == "locked" else teacher.embed_dim
    return ClipStudent(clip, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, text_mode=text_mode,
                       tokenizer=tokenizer, teacher_embed_dim=head_dim)


def _copy_text_tower(source: nn.Module, target: nn.Module) -> None:
    """Copy every non-image weight (text tower, not the logit scale) of one open_clip model into another."""
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("visual.") and "logit" not in k}
    missing, unexpected = target.load_state_dict(state, strict=False)
    text_missing = [k for k in missing if not k.startswith("visual.") and "logit" not in k]
    if text_missing or unexpected:
        raise ModelLoadError(f"the teacher's text tower does not fit the student ({(text_missing + unexpected)[0]})")


def image_tower_parameters(model: nn.Module) -> int:
    """Parameters of a CLIP image tower (open_clip ``visual``; transformers vision model and projection)."""
    for attribute in ("clip", "model"):  # a ClipStudent or ClipTeacher wrapper
        if isinstance(getattr(model, attribute, None), nn.Module):
            model = getattr(model, attribute)
    if hasattr(model, "visual"):
        return sum(p.numel() for p in model.visual.parameters())
    return sum(p.numel() for m in (model.vision_model, model.visual_projection) for p in m.parameters())
