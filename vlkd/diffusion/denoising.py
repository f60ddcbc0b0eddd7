"""Plain diffusion training (Ho et al. 2020), the loss the shipped teachers are trained with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkd import rng
from vlkd.diffusion.schedule import NoiseSchedule


class DenoisingLoss:
    """Noise a clean batch at a uniform timestep and regress the scheduler's prediction target (eps, v or x0)."""

    def __init__(self, schedule: NoiseSchedule, class_conditional: bool = False):
        self.schedule = schedule
        self.class_conditional = class_conditional

    def __call__(self, unet: nn.Module, teacher: None, batch: dict) -> dict[str, torch.Tensor]:
        x0 = batch["pixel_values"]
        t = rng.randint(batch, 0, self.schedule.num_train_timesteps, "timestep", x0.device)
        eps = rng.randn(batch, x0.shape[1:], "noise", x0.device)
        z = self.schedule.add_noise(x0, eps, t)
        labels = batch["label"] if self.class_conditional else None
        output = unet(z, t, class_labels=labels).sample
        target = self.schedule.target(x0, eps, t)
        return {"mse": F.mse_loss(output.float(), target.float())}
