"""Diffusion teachers: a diffusers UNet2DModel and the DDPM-family schedule it was trained with.

A teacher is a diffusers pipeline folder (``model_index.json`` naming ``unet`` and ``scheduler``), a folder with
``unet/`` and ``scheduler/`` but no index, a bare UNet folder (``config.json`` + weights) with a
``scheduler_config.json`` beside it, or a Hugging Face Hub id of any of these.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlkd.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule
from vlkd.errors import MODEL_LOAD_ERRORS, DataError, ModelLoadError, load_failure

# Schedulers whose config describes the discrete variance-preserving process z_t = alpha_t x + sigma_t eps by its
# betas: a UNet trained under any of them is a DDPM-family model. Sigma- and flow-based ones (EDM, consistency
# models, score-SDE VE, flow matching) describe a different process and cannot be distilled here.
DDPM_FAMILY_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler", "PNDMScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
    "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "LCMScheduler",
    "TCDScheduler",
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["model_index.json", "unet/*", "scheduler/*", "config.json", "scheduler_config.json",
              "diffusion_pytorch_model.*"]


@dataclass
class Teacher:
    """A loaded teacher: its UNet (eval mode, frozen by the loop) and the noise schedule of its scheduler."""

    unet: Any  # diffusers UNet2DModel
    schedule: NoiseSchedule
    scheduler_class: str
    source: str  # as the recipe names it
    folder: Path

    @property
    def prediction_type(self) -> str:
        """What the UNet outputs: epsilon, v_prediction or sample."""
        return self.schedule.prediction_type

    @property
    def num_classes(self) -> int | None:
        """The number of class labels a class-conditional UNet takes, else None."""
        return self.unet.config.num_class_embeds

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the UNet denoises."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    def check_sample(self, sample: dict[str, Any], data: str) -> None:
        """A DataError unless ``sample`` (from the recipe's ``data``) is something this teacher can be distilled on."""
        shape = tuple(sample["pixel_values"].shape)
        if shape != self.image_shape:
            raise DataError(f"data {data} gives {'x'.join(map(str, shape))} images but the teacher's UNet denoises "
                            f"{'x'.join(map(str, self.image_shape))}; use data of the teacher's size")
        if self.num_classes and "label" not in sample:
            raise DataError(f"the teacher is class-conditional but data {data} has no labels; use labelled data")

    def describe(self) -> dict[str, Any]:
        """Plain facts about the teacher, for vlkd.json."""
        return {"path": self.source, "scheduler": self.scheduler_class, "prediction_type": self.prediction_type,
                "num_train_timesteps": self.schedule.num_train_timesteps,
                "beta_schedule": self.schedule.config.get("beta_schedule"), "num_classes": self.num_classes,
                "image_shape": list(self.image_shape)}


def load_teacher(source: str | Path) -> Teacher:
    """Load a DDPM-family teacher; a one-line ModelLoadError says what is missing or unusable."""
    folder = resolve_teacher_folder(source)
    where = f"teacher {source}"
    unet_folder, scheduler_file = _find_parts(folder, where)
    scheduler_config = read_config(scheduler_file, where)
    check_scheduler(scheduler_config, where)
    unet = _load_unet(unet_folder, where)
    _check_unet(unet, where)
    schedule = NoiseSchedule(scheduler_config)
    return Teacher(unet=unet.eval().requires_grad_(False), schedule=schedule,
                   scheduler_class=scheduler_config.get("_class_name", "DDPMScheduler"), source=str(source),
                   folder=folder)


def resolve_teacher_folder(source: str | Path, hub_files: list[str] | None = None) -> Path:
    """A local folder for ``source``: the path itself, a path under vlkd's ``assets/``, or a Hub download of
    ``hub_files`` (patterns; default: what a UNet2DModel teacher needs)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.parts[:1] == ("assets",):
        from vlkd.data import assets_dir

        shipped = assets_dir().joinpath(*path.parts[1:])
        if shipped.is_dir():
            return shipped
    if path.exists():
        raise ModelLoadError(f"teacher {source} is a file; pass a diffusers folder with unet/ and scheduler/")
    if _HUB_ID.match(str(source)):
        return _download(str(source), hub_files or _HUB_FILES)
    raise ModelLoadError(f"teacher {source}: no such folder; pass a diffusers pipeline folder with unet/ and "
                         "scheduler/ (e.g. assets/teachers/ddpm-digits)")


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo: the same one-line problem
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"teacher {repo_id}: not a local folder and not downloadable from the Hugging Face "
                             f"Hub ({type(exc).__name__}: {reason})") from None


def _find_parts(folder: Path, where: str) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a teacher folder in any of the accepted layouts."""
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = read_config(index_file, where)
        for part in ("unet", "scheduler"):
            entry = index.get(part)
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
                listed = ", ".join(k for k in index if not k.startswith("_")) or "nothing"
                raise ModelLoadError(f"{where}: model_index.json names no {part} (it lists {listed}); a teacher "
                                     "needs a UNet and a scheduler")
    if (folder / "unet" / "config.json").is_file():
        unet_folder = folder / "unet"
    elif _read_config_if(folder / "config.json", where).get("_class_name", "").startswith("UNet"):
        unet_folder = folder
    else:
        raise ModelLoadError(f"{where}: no UNet (expected unet/config.json or a UNet config.json in {folder})")
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if candidate.is_file():
            return unet_folder, candidate
    raise ModelLoadError(f"{where}: no scheduler (expected scheduler/scheduler_config.json in {folder}); save the "
                         "teacher with its pipeline's save_pretrained")


def check_scheduler(config: dict[str, Any], where: str) -> None:
    """A DDPM-family scheduler with a beta schedule and a prediction type vlkd can convert; else a ModelLoadError."""
    name = config.get("_class_name", "DDPMScheduler")
    if name not in DDPM_FAMILY_SCHEDULERS:
        raise ModelLoadError(f"{where}: scheduler {name} is not a DDPM-family (beta schedule) scheduler; "
                             "progressive and consistency distillation need a DDPM/DDIM-style teacher")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelLoadError(f"{where}: prediction_type {prediction!r} cannot be used; distillation needs "
                             f"{', '.join(PREDICTION_TYPES)}")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ModelLoadError(f"{where}: beta_schedule {config.get('beta_schedule')!r} is unknown; expected one "
                             f"of {', '.join(BETA_SCHEDULES)} or trained_betas")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ModelLoadError(f"{where}: scheduler {name} uses {config['timestep_type']} timesteps; distillation "
                             "needs a UNet trained on discrete timesteps 0..T-1")


def _load_unet(folder: Path, where: str) -> Any:
    from diffusers import UNet2DModel

    name = read_config(folder / "config.json", where).get("_class_name", "")
    if name == "UNet2DConditionModel":
        raise ModelLoadError(f"{where}: its UNet2DConditionModel is text-conditioned; distil it with pipeline: lcm "
                             "(progressive and consistency take a UNet2DModel)")
    if name != "UNet2DModel":
        raise ModelLoadError(f"{where}: UNet class {name or '(none)'} is not supported; progressive and "
                             "consistency distillation take a diffusers UNet2DModel")
    try:
        return UNet2DModel.from_pretrained(folder)
    except MODEL_LOAD_ERRORS as exc:
        reason = load_failure(exc)
        raise ModelLoadError(f"{where}: cannot load the UNet in {folder}: {reason}") from None


def _check_unet(unet: Any, where: str) -> None:
    config = unet.config
    if config.out_channels != config.in_channels:
        raise ModelLoadError(f"{where}: the UNet outputs {config.out_channels} channels for {config.in_channels} "
                             "input channels (a learned variance?); distillation needs one prediction per channel")
    if getattr(unet, "class_embedding", None) is not None and config.num_class_embeds is None:
        raise ModelLoadError(f"{where}: class_embed_type {config.class_embed_type!r} takes continuous labels; only "
                             "num_class_embeds (integer class labels) is supported")


def read_config(path: Path, where: str) -> dict[str, Any]:
    """A JSON object from a model folder, or a one-line ModelLoadError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{where}: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where}: {path} holds {type(data).__name__}, not a JSON object")
    return data


def _read_config_if(path: Path, where: str) -> dict[str, Any]:
    return read_config(path, where) if path.is_file() else {}
