"""Train the shipped digits DDPM teacher (assets/teachers/ddpm-digits) with vlkd's training loop.

A diffusers UNet2DModel on `digits:16` with a 1,000-step DDPMScheduler; the EMA weights are saved with
DDPMPipeline.save_pretrained, so DDPMPipeline / DDIMPipeline.from_pretrained load it with diffusers alone.
Measure it afterwards with scripts/evaluate_teacher.py.

    python scripts/train_teacher_ddpm.py --out assets/teachers/ddpm-digits
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from vlkd.data import build_dataset
from vlkd.diffusion.denoising import DenoisingLoss
from vlkd.diffusion.schedule import NoiseSchedule
from vlkd.files import staged_folder, write_json
from vlkd.recipes import TrainConfig
from vlkd.train import fit


def build_unet(size: int, channels: tuple[int, ...]) -> UNet2DModel:
    """A small UNet: plain ResNet blocks at full resolution, self-attention at the two lower ones."""
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(channels) - 1)
    return UNet2DModel(
        sample_size=size, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=2,
        down_block_types=down, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        norm_num_groups=16, attention_head_dim=16,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/teachers/ddpm-digits")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", default="32,64,64")
    parser.add_argument("--prediction-type", default="v_prediction", choices=["epsilon", "v_prediction"])
    parser.add_argument("--beta-schedule", default="squaredcos_cap_v2")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when sharing the cores)")
    parser.add_argument("--run-dir", default="runs/teacher-ddpm")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    channels = tuple(int(c) for c in args.channels.split(","))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.beta_schedule,
                              prediction_type=args.prediction_type, clip_sample=False)
    dataset = build_dataset(f"digits:{args.size}", split="all")
    torch.manual_seed(args.seed)
    unet = build_unet(args.size, channels)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                         lr_schedule="cosine", warmup_steps=200, seed=args.seed, checkpoint_every=500,
                         max_grad_norm=1.0)

    start = time.time()
    result = fit(DenoisingLoss(NoiseSchedule(scheduler.config)), unet, dataset, config, args.run_dir,
                 resume=args.resume, desc="ddpm teacher")
    final = result.final_model()
    clock = result.clock(start, key="training_minutes")  # every leg of a resumed run
    with staged_folder(args.out, overwrite=args.overwrite) as folder:
        DDPMPipeline(unet=final, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
        write_json(folder / "training.json", {
            "data": f"digits:{args.size} (all 1,797 images)", "unet_channels": list(channels),
            "parameters": sum(p.numel() for p in final.parameters()), "prediction_type": args.prediction_type,
            "beta_schedule": args.beta_schedule, "optimizer_steps": result.steps, "batch_size": args.batch_size,
            "lr": args.lr, "lr_schedule": "cosine, 200 warmup steps", "ema_decay": args.ema_decay,
            "seed": args.seed, **clock,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "command": "python scripts/train_teacher_ddpm.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if v not in (None, False) and k not in ("resume", "overwrite", "run_dir", "threads")),
            "final_loss": result.history[-1] if result.history else None,
        })
    print(f"wrote {args.out} after {result.steps} steps in {clock['training_minutes']} training minutes")


if __name__ == "__main__":
    main()
