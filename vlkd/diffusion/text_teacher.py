"""Text-to-image teachers for latent consistency distillation: a Stable Diffusion 1.x/2.x or SDXL pipeline folder.

A teacher is a diffusers pipeline folder (``model_index.json``) or a Hugging Face Hub id of one, with a VAE, a
UNet2DConditionModel, a DDPM-family scheduler, and one text encoder and tokenizer (SD 1.x/2.x) or two (SDXL, whose
UNet also takes pooled text embeddings and size/crop time ids: ``addition_embed_type="text_time"``). The configs
are checked against each other before any weights load, so a mismatched folder fails in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlkd.diffusion.schedule import NoiseSchedule
from vlkd.diffusion.teacher import check_scheduler, read_config, resolve_teacher_folder
from vlkd.errors import MODEL_LOAD_ERRORS, DataError, ModelLoadError, load_failure

# What a Hub download fetches: configs, tokenizers and safetensors weights of the parts used, nothing else (the
# Stable Diffusion repositories also hold full-precision .ckpt files and pickled .bin copies of every weight).
_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
HUB_FILES = ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*",
             *[f"{part}/config.json" for part in _PARTS],
             *[f"{part}/{name}" for part in _PARTS
               for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "*.safetensors.index.json",
                            "diffusion_pytorch_model-*.safetensors", "model-*.safetensors")]]
SD_PARTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
SDXL_PARTS = SD_PARTS + ("text_encoder_2", "tokenizer_2")


@dataclass
class TextToImageTeacher:
    """A loaded text-to-image teacher: its diffusers pipeline (frozen parts) and its scheduler's noise schedule."""

    pipeline: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    schedule: NoiseSchedule
    scheduler_class: str
    source: str  # as the recipe names it
    folder: Path

    @property
    def sdxl(self) -> bool:
        """Two text encoders, pooled embeddings and time ids (SDXL) rather than one encoder (SD 1.x/2.x)."""
        return getattr(self.pipeline, "text_encoder_2", None) is not None

    @property
    def unet(self) -> Any:
        """The teacher's UNet2DConditionModel."""
        return self.pipeline.unet

    @property
    def vae(self) -> Any:
        """The teacher's AutoencoderKL."""
        return self.pipeline.vae

    @property
    def prediction_type(self) -> str:
        """What the UNet outputs: epsilon, v_prediction or sample."""
        return self.schedule.prediction_type

    @property
    def num_classes(self) -> None:
        """Text-conditioned: no class labels."""
        return None

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel along each side (the VAE's downsampling)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The side the pipeline samples at by default (UNet sample size times the VAE's downsampling)."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.latent_scale

    def check_sample(self, sample: dict[str, Any], data: str) -> None:
        """A DataError unless ``sample`` is a captioned image the VAE and UNet can take."""
        if not isinstance(sample.get("caption"), str):
            raise DataError(f"data {data} has no captions; latent consistency distillation needs captioned images "
                            "(shapes:SIZE, csv:PATH, wds:PATTERN with .txt captions)")
        channels, height, width = sample["pixel_values"].shape
        multiple = self.latent_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if channels != self.vae.config.in_channels or height % multiple or width % multiple:
            raise DataError(f"data {data} gives {channels}x{height}x{width} images; the teacher's VAE and UNet take "
                            f"{self.vae.config.in_channels}-channel images whose sides are multiples of {multiple} "
                            f"(it samples at {self.image_size}); set method.image_size or use such data")

    def describe(self) -> dict[str, Any]:
        """Plain facts about the teacher, for vlkd.json."""
        return {"path": self.source, "pipeline": type(self.pipeline).__name__, "scheduler": self.scheduler_class,
                "prediction_type": self.prediction_type, "num_train_timesteps": self.schedule.num_train_timesteps,
                "beta_schedule": self.schedule.config.get("beta_schedule"), "sdxl": self.sdxl,
                "image_size": self.image_size, "latent_channels": self.unet.config.in_channels}


def load_text_to_image_teacher(source: str | Path) -> TextToImageTeacher:
    """Load an SD 1.x/2.x or SDXL teacher; a one-line ModelLoadError says what is missing or does not fit."""
    folder = resolve_teacher_folder(source, HUB_FILES)
    where = f"teacher {source}"
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{where}: no model_index.json in {folder}; pass a text-to-image pipeline folder "
                             "(Stable Diffusion or SDXL, saved with save_pretrained) or its Hub id")
    index = read_config(folder / "model_index.json", where)
    sdxl = bool(index.get("text_encoder_2") and index["text_encoder_2"][0])
    for part in SDXL_PARTS if sdxl else SD_PARTS:
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            listed = ", ".join(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[1])
            raise ModelLoadError(f"{where}: model_index.json names no {part} (it lists {listed or 'nothing'}); "
                                 "latent consistency distillation needs a VAE, a tokenizer and a text encoder beside "
                                 "the UNet and scheduler")
    configs = {part: read_config(folder / part / "config.json", where) for part in _PARTS if part in index and
               (part != "text_encoder_2" or sdxl)}
    scheduler_config = read_config(folder / "scheduler" / "scheduler_config.json", where)
    check_scheduler(scheduler_config, where)
    _check_configs(configs, sdxl, where)

    import transformers  # noqa: F401 - imported first, so that its loading bars are silenced too
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from vlkd.diffusion.sample import loading_quietly

    # The safety checker (1.2 GB in SD 1.5) takes no part in training and is not exported.
    options: dict[str, Any] = ({"add_watermarker": False} if sdxl else
                               {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
    try:
        with loading_quietly():
            pipeline = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(folder,
                                                                                                      **options)
    except MODEL_LOAD_ERRORS as exc:
        raise ModelLoadError(f"{where}: cannot load the pipeline in {folder}: {load_failure(exc)}") from None
    pipeline.set_progress_bar_config(disable=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, part, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return TextToImageTeacher(pipeline=pipeline, schedule=NoiseSchedule(scheduler_config),
                              scheduler_class=scheduler_config.get("_class_name", "DDPMScheduler"),
                              source=str(source), folder=folder)


def _check_configs(configs: dict[str, dict[str, Any]], sdxl: bool, where: str) -> None:
    """The UNet, VAE and text encoders fit together (widths, channels, conditioning), from their configs alone."""
    unet, vae = configs["unet"], configs["vae"]
    if unet.get("_class_name") != "UNet2DConditionModel":
        raise ModelLoadError(f"{where}: its UNet is a {unet.get('_class_name') or '(no class)'}; latent consistency "
                             "distillation takes a text-conditioned UNet2DConditionModel (use pipeline: consistency "
                             "for a UNet2DModel)")
    if unet.get("out_channels", 4) != unet.get("in_channels", 4):
        raise ModelLoadError(f"{where}: the UNet outputs {unet.get('out_channels')} channels for "
                             f"{unet.get('in_channels')} input channels; distillation needs one prediction per channel")
    if vae.get("latent_channels", 4) != unet.get("in_channels", 4):
        raise ModelLoadError(f"{where}: the VAE makes {vae.get('latent_channels', 4)}-channel latents but the UNet "
                             f"takes {unet.get('in_channels', 4)} channels; the VAE and UNet must be one pipeline's")
    widths = [configs["text_encoder"].get("hidden_size")]
    if sdxl:
        widths.append(configs["text_encoder_2"].get("hidden_size"))
    text_width = sum(w for w in widths if isinstance(w, int))
    attends = unet.get("cross_attention_dim", 1280)
    attends = set(attends) if isinstance(attends, (list, tuple)) else {attends}
    if attends != {text_width}:
        described = " + ".join(map(str, widths))
        raise ModelLoadError(f"{where}: the UNet attends to {'/'.join(map(str, sorted(attends)))}-wide text "
                             f"features (cross_attention_dim) but the text encoder(s) give {described}; the UNet "
                             "and text encoder(s) must come from the same pipeline")
    if sdxl:
        if unet.get("addition_embed_type") != "text_time":
            raise ModelLoadError(f"{where}: an SDXL-style pipeline (two text encoders) needs a UNet with "
                                 f"addition_embed_type 'text_time', not {unet.get('addition_embed_type')!r}")
        pooled = configs["text_encoder_2"].get("projection_dim")
        expected = 6 * unet.get("addition_time_embed_dim", 256) + (pooled or 0)
        if unet.get("projection_class_embeddings_input_dim") != expected:
            raise ModelLoadError(f"{where}: the UNet's added conditioning takes "
                                 f"{unet.get('projection_class_embeddings_input_dim')} features, not the {expected} of "
                                 f"6 size/crop time ids and {pooled}-wide pooled text embeddings (an SDXL refiner "
                                 "is not supported)")
    elif unet.get("addition_embed_type") is not None:
        raise ModelLoadError(f"{where}: the UNet takes {unet['addition_embed_type']!r} added conditioning, which a "
                             "one-text-encoder (SD 1.x/2.x) pipeline does not provide")
