"""Latent consistency distillation (Luo et al. 2023) of Stable Diffusion and SDXL teachers: LCM and LCM-LoRA.

Consistency distillation (``vlkd.diffusion.consistency``) in the teacher's VAE latent space, conditioned on the
captions through the teacher's text encoder(s), with classifier-free guidance distilled in: each sample draws a
guidance scale w uniformly from [w_min, w_max], and the teacher's DDIM step uses its guided x0 and eps,
``uncond + w (cond - uncond)``. w is in the convention of diffusers' pipelines (1 = no guidance), so a student
trained at w samples with ``pipe(guidance_scale=w)``.

- ``lcm``: the student is a new UNet2DConditionModel from the teacher's config with ``time_cond_proj_dim`` set and
  the teacher's weights; it sees w as ``timestep_cond``, the embedding diffusers' LCM pipeline gives it at
  sampling; the target network is an EMA copy of the student.
- ``lcm-lora``: LoRA adapters on the teacher UNet's attention projections are the student; the teacher is the same
  UNet with its adapters off, the target is the online student under no_grad (no copy), and w is not an input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlkd import rng
from vlkd.diffusion.consistency import ConsistencyConfig, ConsistencyDistillation
from vlkd.diffusion.schedule import NoiseSchedule
from vlkd.errors import RecipeError


@dataclass
class LatentConsistencyConfig(ConsistencyConfig):
    """Recipe section ``method`` of the ``lcm`` pipeline: the consistency settings plus guidance and data size."""

    # Guidance scales in the pipelines' convention (1 = none); diffusers' example draws 5..15 in the paper's
    # convention (its w + 1 = ours), i.e. 6..16 here.
    w_min: float = 6.0
    w_max: float = 16.0
    guidance_scale: float | None = None  # what sampling defaults to (vlkd.json, model card); None: mid-range
    image_size: int | None = None  # the side file datasets (csv, wds) are read at; None: the teacher's
    # Training pool: the first pool_size samples (needed for unlimited data such as shapes' train split); None: all.
    pool_size: int | None = None
    # VAE posteriors and text-encoder states of the pool computed once into safetensors shards (vlkd.cache) and
    # read by sample index, so neither the VAE encoder nor the text encoder runs during training.
    cache: bool = False
    cache_dir: str = "runs/cache/lcm-teacher"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.w_min < 1:
            raise RecipeError(f"method.w_min is {self.w_min}, but guidance scales count from 1 (no guidance, the "
                              "convention of diffusers' pipelines); set w_min to 1 or more")
        if self.w_max < self.w_min:
            raise RecipeError(f"method.w_max {self.w_max} is below w_min {self.w_min}; give a range w_min <= w_max")
        if self.guidance_scale is not None and self.guidance_scale < 1:
            raise RecipeError(f"method.guidance_scale is {self.guidance_scale}; use 1 (no guidance) or more")
        if self.pool_size is not None and self.pool_size < 1:
            raise RecipeError(f"method.pool_size must be at least 1, got {self.pool_size}")

    @property
    def sample_guidance_scale(self) -> float:
        """The guidance scale samplers default to."""
        return self.guidance_scale if self.guidance_scale is not None else (self.w_min + self.w_max) / 2


@dataclass
class LCMLoRAConfig(LatentConsistencyConfig):
    """Recipe section ``method`` of the ``lcm-lora`` pipeline. The target is the online student (no EMA copy),
    and guidance is baked into the adapters, so sampling defaults to guidance_scale 1 (no extra guidance)."""

    target_ema: float = 0.0
    guidance_scale: float | None = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_ema != 0.0:
            raise RecipeError("method.target_ema: lcm-lora has no separate target network (the online LoRA student "
                              "is the target); leave target_ema out")


@dataclass
class LCMStudentConfig:
    """Recipe section ``student`` of ``lcm``: the teacher's UNet plus a guidance-scale embedding of this width,
    optionally with deeper transformers (more text-conditioned capacity, started as the teacher's function)."""

    time_cond_proj_dim: int = 256
    # None: the teacher's depth. A number: that many transformer blocks in every cross-attention block, the
    # teacher's loaded into the first ones and the others starting as identities (see lcm_student).
    transformer_layers_per_block: int | None = None

    def __post_init__(self) -> None:
        if self.time_cond_proj_dim < 2:
            raise RecipeError(f"student.time_cond_proj_dim must be at least 2, got {self.time_cond_proj_dim}")
        if self.transformer_layers_per_block is not None and self.transformer_layers_per_block < 1:
            raise RecipeError("student.transformer_layers_per_block must be at least 1 (or left out for the "
                              f"teacher's depth), got {self.transformer_layers_per_block}")


@dataclass
class LoRAStudentConfig:
    """Recipe section ``student`` of ``lcm-lora``: LoRA adapters of rank ``rank`` on the named UNet layers."""

    rank: int = 64
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise RecipeError(f"student.rank must be at least 1, got {self.rank}")
        if not self.target_modules:
            raise RecipeError("student.target_modules is empty; name the UNet layers to adapt, e.g. [to_q, to_k]")


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """``timestep_cond`` for guidance scales ``w`` (pipeline convention), as diffusers' LCM pipeline makes it."""
    from diffusers import LatentConsistencyModelPipeline

    # diffusers has this embedding only as a pipeline method (it does not use self). Its pipelines embed
    # guidance_scale - 1, the paper's convention; embedding w - 1 makes pipe(guidance_scale=w) the trained w.
    # Computed on the CPU: the method builds its frequency table there.
    embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w.detach().float().cpu() - 1,
                                                                            embedding_dim=dim)
    return embedding.to(w.device)


def lcm_student(teacher_unet: nn.Module, config: LCMStudentConfig) -> nn.Module:
    """A UNet2DConditionModel with the teacher's config and weights and the ``student`` section's guidance
    embedding; ``config.transformer_layers_per_block`` deepens every cross-attention block, new blocks as identities."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    overrides = {"time_cond_proj_dim": config.time_cond_proj_dim}
    if config.transformer_layers_per_block is not None:
        teacher_depth = teacher_unet.config.transformer_layers_per_block  # an int, or one per block (SDXL)
        depths = teacher_depth if isinstance(teacher_depth, (list, tuple)) else [teacher_depth]
        if config.transformer_layers_per_block < max(depths):
            raise RecipeError(f"student.transformer_layers_per_block {config.transformer_layers_per_block} is "
                              f"shallower than the teacher's {teacher_depth}; the student can only add blocks")
        overrides["transformer_layers_per_block"] = config.transformer_layers_per_block
    student = UNet2DConditionModel.from_config(teacher_unet.config, **overrides)
    own = student.state_dict()
    fitting = {key: value for key, value in teacher_unet.state_dict().items()
               if key in own and own[key].shape == value.shape}
    student.load_state_dict(fitting, strict=False)
    # The guidance projection starts at zero, so the student starts as exactly the teacher (whose x0 is the best
    # first guess of the consistency function) and learns how w changes it.
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    # Each transformer block adds its attention and feed-forward outputs to a residual stream, so zeroing the
    # output projections of the blocks the teacher lacks keeps that start exact while the new blocks learn.
    teacher_blocks = {name for name, module in teacher_unet.named_modules()
                      if isinstance(module, BasicTransformerBlock)}
    for name, block in student.named_modules():
        if isinstance(block, BasicTransformerBlock) and name not in teacher_blocks:
            for projection in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[-1]):
                nn.init.zeros_(projection.weight)
                nn.init.zeros_(projection.bias)
    return student.train().requires_grad_(True)


def lora_student(unet: nn.Module, config: LoRAStudentConfig) -> nn.Module:
    """``unet`` itself with fresh LoRA adapters (the only trainable parameters); the adapters start as a no-op."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank, target_modules=list(config.target_modules))
    try:
        unet.add_adapter(lora)
    except ValueError as exc:  # peft: no layer matches target_modules
        raise RecipeError(f"student.target_modules {list(config.target_modules)} match no layer of the teacher's UNet "
                          f"({(str(exc).splitlines() or ['?'])[0]}); name attention projections such as to_q, to_v"
                          ) from None
    return unet.train()


@dataclass
class GuidedCondition:
    """What the networks are conditioned on for one batch: text (conditional and empty prompt), w and its embedding."""

    text: torch.Tensor  # (B, tokens, width): encoder_hidden_states of the captions
    empty_text: torch.Tensor  # (B, tokens, width): of the empty prompt (the unconditional branch)
    w: torch.Tensor  # (B,) guidance scales
    w_embedding: torch.Tensor | None  # (B, time_cond_proj_dim) for an ``lcm`` student; None for LoRA
    pooled: torch.Tensor | None = None  # SDXL: pooled text embeddings, and those of the empty prompt
    empty_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL: (original size, crop top-left, target size) per sample

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a UNet2DConditionModel call on the captions."""
        return self._kwargs(self.text, self.pooled, self.time_ids)

    def guided_kwargs(self) -> dict[str, Any]:
        """The same for a doubled batch: the empty prompt's half first, then the captions'."""
        time_ids = None if self.time_ids is None else torch.cat([self.time_ids, self.time_ids])
        pooled = None if self.pooled is None else torch.cat([self.empty_pooled, self.pooled])
        return self._kwargs(torch.cat([self.empty_text, self.text]), pooled, time_ids)

    @staticmethod
    def _kwargs(text: torch.Tensor, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": text}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs


class FrozenTextToImageTeacher(nn.Module):
    """The teacher as the training loop holds it: VAE, text encoder(s) and UNet as submodules (frozen and moved by
    ``fit``), with the encodings a batch needs. For LoRA the UNet is the student's, run with adapters off."""

    def __init__(self, teacher: Any, lora_unet: nn.Module | None = None):
        super().__init__()
        self.pipeline = teacher.pipeline  # for diffusers' own prompt encoding; not a module
        self.vae = teacher.pipeline.vae
        self.text_encoder = teacher.pipeline.text_encoder
        self.text_encoder_2 = getattr(teacher.pipeline, "text_encoder_2", None)
        if lora_unet is None:
            self.unet = teacher.pipeline.unet
        else:
            # Not registered: the loop would freeze the student's adapters with the teacher, and move it twice.
            object.__setattr__(self, "unet", None)
            object.__setattr__(self, "lora_unet", lora_unet)
        self._empty: dict[str, Any] = {}

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE posterior of images in [-1, 1] (float32)."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, batch: dict) -> torch.Tensor:
        """Scaled latents drawn from posteriors with each sample's own seed."""
        noise = rng.randn(batch, mean.shape[1:], "latent", mean.device).to(mean.dtype)
        return (mean + std * noise) * self.vae.config.scaling_factor

    def latents(self, pixels: torch.Tensor, batch: dict) -> torch.Tensor:
        """VAE latents of images in [-1, 1], each drawn from its posterior with the sample's own seed."""
        return self.sample_latents(*self.posterior(pixels), batch)

    @torch.no_grad()
    def cache_rows(self, batch: dict, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """What ``vlkd.cache`` keeps per sample: the VAE posterior and the caption's text-encoder states."""
        mean, std = self.posterior(batch["pixel_values"].to(device))
        text, _, pooled, _ = self.text(batch["caption"], device)
        rows = {"latent_mean": mean, "latent_std": std, "text": text}
        if pooled is not None:
            rows["pooled"] = pooled
        return rows, {}

    @torch.no_grad()
    def text(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(captions, empty prompt, captions' pooled, empty prompt's pooled) embeddings as the pipeline makes them;
        the pooled ones are None for SD 1.x/2.x."""
        encoded = self.pipeline.encode_prompt(prompt=list(captions), device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        pooled = encoded[2] if len(encoded) == 4 else None
        empty_text, empty_pooled = self.empty_text(len(captions), device)
        return encoded[0].float(), empty_text, None if pooled is None else pooled.float(), empty_pooled

    @torch.no_grad()
    def empty_text(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The empty prompt's embeddings (and pooled embeddings for SDXL), repeated ``count`` times."""
        key = str(device)
        if key not in self._empty:
            # The unconditional branch is what the pipeline uses without a negative prompt: encode("") for SD, zeros
            # for SDXL with force_zeros_for_empty_prompt. Computed once: it is the same for every batch.
            empty = self.pipeline.encode_prompt(prompt=[""], device=device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=True)
            self._empty = {key: (empty[1], empty[3] if len(empty) == 4 else None)}
        empty_text, empty_pooled = self._empty[key]
        return (empty_text.float().expand(count, -1, -1),
                None if empty_pooled is None else empty_pooled.float().expand(count, -1))

    def run_unet(self, z: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The teacher UNet's raw output; for LoRA the student's UNet with its adapters off (its base weights)."""
        if self.unet is not None:
            return self.unet(z, t, **kwargs).sample.float()
        self.lora_unet.disable_adapters()
        try:
            return self.lora_unet(z, t, **kwargs).sample.float()
        finally:
            self.lora_unet.enable_adapters()


class LatentConsistencyDistillation(ConsistencyDistillation):
    """LCM: consistency distillation with VAE latents, text conditioning and distilled classifier-free guidance."""

    def __init__(self, schedule: NoiseSchedule, student: nn.Module, config: LatentConsistencyConfig,
                 lora: bool = False, cache: Any = None):
        super().__init__(schedule, student, config, separate_target=not lora)
        self.time_cond_proj_dim = None if lora else student.config.time_cond_proj_dim
        self.cache = cache  # a vlkd.cache.PoolCache of FrozenTextToImageTeacher.cache_rows, read by batch["index"]

    def inputs(self, teacher: FrozenTextToImageTeacher, batch: dict) -> tuple[torch.Tensor, GuidedCondition]:
        pixels = batch["pixel_values"]
        if self.cache is None:
            latents = teacher.latents(pixels, batch)
            text, empty_text, pooled, empty_pooled = teacher.text(batch["caption"], pixels.device)
        else:
            rows = self.cache.lookup(torch.as_tensor(batch["index"], device=pixels.device))
            latents = teacher.sample_latents(rows["latent_mean"], rows["latent_std"], batch)
            text, pooled = rows["text"], rows.get("pooled")
            empty_text, empty_pooled = teacher.empty_text(len(pixels), pixels.device)
        config: LatentConsistencyConfig = self.config
        w = config.w_min + (config.w_max - config.w_min) * rng.rand(batch, (), "guidance", pixels.device)
        w_embedding = None if self.time_cond_proj_dim is None else guidance_embedding(w, self.time_cond_proj_dim)
        time_ids = None
        if pooled is not None:
            # SDXL's size conditioning: the images are used whole, at their own size (no crop, no resize).
            height, width = pixels.shape[-2:]
            time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=pixels.device)
            time_ids = time_ids.expand(len(pixels), -1)
        return latents, GuidedCondition(text, empty_text, w, w_embedding, pooled, empty_pooled, time_ids)

    def network(self, model: nn.Module, z: torch.Tensor, t: torch.Tensor, condition: GuidedCondition
                ) -> torch.Tensor:
        return model(z, t, timestep_cond=condition.w_embedding, **condition.unet_kwargs()).sample.float()

    def teacher_x0_eps(self, teacher: FrozenTextToImageTeacher, z: torch.Tensor, t: torch.Tensor,
                       condition: GuidedCondition) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's guided (x0, eps): uncond + w (cond - uncond) for each."""
        if bool((condition.w == 1).all()):  # no guidance anywhere: the unconditional half would be weighted by 0
            return self.schedule.to_x0_eps(teacher.run_unet(z, t, **condition.unet_kwargs()), z, t)
        # One pass over the doubled batch (empty prompt, captions) instead of two.
        output = teacher.run_unet(torch.cat([z, z]), torch.cat([t, t]), **condition.guided_kwargs())
        x0s, epss = self.schedule.to_x0_eps(output, torch.cat([z, z]), torch.cat([t, t]))
        (empty_x0, x0), (empty_eps, eps) = x0s.chunk(2), epss.chunk(2)
        w = condition.w.to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
        return empty_x0 + w * (x0 - empty_x0), empty_eps + w * (eps - empty_eps)
