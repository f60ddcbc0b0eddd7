"""Variance-preserving noise schedules of diffusers' DDPM-family schedulers, in closed form.

z_t = alpha_t x + sigma_t eps with alpha_t^2 + sigma_t^2 = 1 (Salimans & Ho 2022 notation). The betas come from
diffusers itself (``DDPMScheduler.from_config``) so every beta schedule it knows, zero-terminal-SNR rescaling
included, is handled the way the exported pipeline will handle it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vlkd.errors import ModelLoadError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule:
    """alpha_t, sigma_t and log-SNR on a DDPM-family scheduler's integer timesteps 0..T-1."""

    def __init__(self, scheduler_config: Mapping[str, Any]):
        from diffusers import DDPMScheduler

        config = dict(scheduler_config)
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"scheduler prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}"
            )
        known = set(DDPMScheduler.config_names) if hasattr(DDPMScheduler, "config_names") else None
        ddpm = DDPMScheduler.from_config({k: v for k, v in config.items() if known is None or k in known})
        alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = int(ddpm.config.num_train_timesteps)
        self.prediction_type: str = prediction
        self.alpha = alphas_cumprod.sqrt()
        self.sigma = (1.0 - alphas_cumprod).sqrt()
        self.config = dict(ddpm.config)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t for integer timesteps ``t`` (shape (B,)), broadcastable against ``like``.

        ``t = -1`` stands for the clean end of the trajectory (alpha 1, sigma 0), where the last DDIM step lands.
        """
        t = t.to("cpu", torch.long)
        alpha = torch.where(t < 0, torch.ones((), dtype=torch.float64), self.alpha[t.clamp(min=0)])
        sigma = torch.where(t < 0, torch.zeros((), dtype=torch.float64), self.sigma[t.clamp(min=0)])
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (alpha.to(like.device, like.dtype).view(shape), sigma.to(like.device, like.dtype).view(shape))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha_t^2 / sigma_t^2) in float64."""
        t = t.to("cpu", torch.long)
        return 2 * (self.alpha[t].log() - self.sigma[t].log())

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t^2 / sigma_t^2 in float64."""
        t = t.to("cpu", torch.long)
        return (self.alpha[t] / self.sigma[t]) ** 2

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = alpha_t x + sigma_t eps."""
        alpha, sigma = self.alpha_sigma(t, x)
        return alpha * x + sigma * noise

    def to_x0_eps(self, output: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                  prediction_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output of ``prediction_type`` at (z_t, t) into (x0, eps) predictions."""
        kind = prediction_type or self.prediction_type
        alpha, sigma = self.alpha_sigma(t, z)
        if kind == "epsilon":
            eps = output
            x0 = (z - sigma * eps) / alpha
        elif kind == "v_prediction":
            x0 = alpha * z - sigma * output
            eps = sigma * z + alpha * output
        elif kind == "sample":
            x0 = output
            eps = (z - alpha * x0) / sigma
        else:
            raise ModelLoadError(f"prediction type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")
        return x0, eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
               prediction_type: str | None = None) -> torch.Tensor:
        """The network output of ``prediction_type`` that corresponds to (x0, eps) at t: eps, v or x0."""
        kind = prediction_type or self.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * eps - sigma * x0

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM update: z_{t'} = alpha_{t'} x0 + sigma_{t'} eps (t' = -1 gives x0)."""
        alpha, sigma = self.alpha_sigma(t_next, x0)
        return alpha * x0 + sigma * eps


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The timesteps a ``DDIMScheduler(timestep_spacing="trailing")`` visits in ``steps`` steps, high to low."""
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]
