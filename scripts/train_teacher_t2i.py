"""Train the shipped shapes text-to-image teacher (assets/teachers/t2i-shapes) with vlkd's training loop.

A Stable Diffusion-style pipeline at 32x32, saved with StableDiffusionPipeline.save_pretrained, so
StableDiffusionPipeline.from_pretrained loads it with diffusers and transformers alone:
- text encoder: the shapes CLIP teacher's text tower (assets/teachers/clip-shapes) converted to a transformers
  CLIPTextModel, with a CLIPTokenizer that reads each caption word as one token (vlkd.diffusion.t2i_build);
  checked against open_clip on every test caption before training, and frozen;
- phase 1: an AutoencoderKL (32x32x3 -> 16x16x4) trained on shapes:32 train images (L1 + L2 + a small KL);
  its scaling_factor is 1 / std of posterior samples of 2,000 train images, as SD sets it; its reconstructions
  of the test images are judged by prompt fidelity (shape and colour kept), since every sample passes its decoder;
- phase 2: a UNet2DConditionModel with cross-attention on the text encoder's last hidden states (at 8x8 and in
  the 4x4 middle; none at 16x16, as SDXL skips its highest resolution), trained with
  SD's objective (epsilon, SD's scaled-linear 1,000-step DDPM betas), 10% of captions dropped to "" for
  classifier-free guidance; the EMA weights are saved.
Both phases checkpoint into --run-dir and continue with --resume (a finished phase 1 is kept in
RUN_DIR/vae-final and never retrained, so a resumed UNet always sees the latents it started on). Each phase
stops at its last checkpoint that fits its time budget (--vae-minutes; --minutes for the whole run, counted
from the start of this invocation), and --max-megabytes refuses parts too large for the folder before training.

    python scripts/train_teacher_t2i.py --out assets/teachers/t2i-shapes --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from vlkd.data import build_dataset
from vlkd.diffusion.schedule import NoiseSchedule
from vlkd.diffusion.t2i_build import (
    AutoencoderLoss,
    FrozenParts,
    TextToImageDenoisingLoss,
    build_scheduler,
    build_unet,
    build_vae,
    latent_std,
    reconstruction_psnr,
    save_tokenizer,
    text_encoder_difference,
    text_encoder_from_clip,
    vae_reconstructions,
)
from vlkd.eval.fidelity import prompt_fidelity, shapes_prompts
from vlkd.files import check_output, staged_folder, write_json
from vlkd.recipes import TrainConfig
from vlkd.train import FitResult, fit, list_checkpoints

TEXT_TOLERANCE = 1e-4  # largest allowed |converted - open_clip| hidden state on the test captions
EXPORT_MINUTES = 2.0  # kept back from --minutes for measuring and saving


class OutOfTime(Exception):
    """Raised by TimeBudget after a checkpoint when the next one would land past the deadline."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class TimeBudget:
    """A fit callback: prints the measured pace once, and stops the phase at its last checkpoint in time."""

    def __init__(self, name: str, deadline: float, checkpoint_every: int, report_after: int = 20):
        self.name, self.deadline, self.checkpoint_every = name, deadline, checkpoint_every
        self.report_after = report_after
        self.first: tuple[float, int] | None = None  # (time, step) after the first step: warm-up excluded
        self.seconds_per_step: float | None = None
        self.reported = False

    def __call__(self, state) -> None:
        from tqdm.auto import tqdm

        now = time.time()
        if self.first is None:
            self.first = (now, state.step)
            return
        self.seconds_per_step = (now - self.first[0]) / (state.step - self.first[1])
        if state.step - self.first[1] == self.report_after or state.step == state.total_steps and not self.reported:
            self.reported = True
            left = (state.total_steps - state.step) * self.seconds_per_step / 60
            tqdm.write(f"{self.name}: {self.seconds_per_step:.3f} s/step over steps {self.first[1] + 1}-{state.step}; "
                       f"the {state.total_steps - state.step} steps left take {left:.1f} min, "
                       f"{(self.deadline - now) / 60:.1f} min left in its budget")
        at_checkpoint = state.step % self.checkpoint_every == 0 and state.step < state.total_steps
        if at_checkpoint and now + self.seconds_per_step * self.checkpoint_every > self.deadline:
            raise OutOfTime(state.step)


def fit_in_time(method, model, dataset, config: TrainConfig, run_dir: Path, budget: TimeBudget, *, resume: bool,
                teacher=None, desc: str) -> tuple[FitResult, bool]:
    """fit, stopped early by ``budget``; returns the result (EMA and history of the last checkpoint when stopped)
    and whether it stopped early."""
    try:
        return fit(method, model, dataset, config, run_dir, teacher=teacher, resume=resume, callbacks=[budget],
                   desc=desc), False
    except OutOfTime as stop:
        print(f"{desc}: time budget reached; stopping at the checkpoint of step {stop.step} of {config.steps}")
        # Resuming for exactly the steps done loads that checkpoint (weights, EMA, history) and trains no further.
        short = dataclasses.replace(config, steps=stop.step)
        return fit(method, model, dataset, short, run_dir, teacher=teacher, resume=True, desc=desc), True


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/teachers/t2i-shapes")
    parser.add_argument("--clip-teacher", default="assets/teachers/clip-shapes", help="open_clip local dir")
    parser.add_argument("--size", type=int, default=32)
    # Two levels (16x16 latents), not SD's 8x downsampling: at 8x8x4 a 1,000-step VAE kept the shape of only 81%
    # of test figures, and at equal steps (300) the 16x16 one kept 71% against 38% (8x8x4), 48% (8x8x8) and
    # 28% (8x8x16).
    parser.add_argument("--vae-channels", default="32,64", help="levels; 2 levels: 32 px -> 16x16 latents")
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="per latent element")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch-size", type=int, default=64)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-channels", default="32,64,128")
    parser.add_argument("--top-attention", action="store_true",
                        help="cross-attention at the highest-resolution level too, as SD 1.x (doubles the step time "
                             "at 16x16 latents)")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4, help="attention heads per UNet level")
    parser.add_argument("--steps", type=int, default=6500, help="UNet optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--minutes", type=float, default=90.0, help="time budget of the whole run")
    parser.add_argument("--vae-minutes", type=float, default=24.0, help="time budget of phase 1")
    parser.add_argument("--measure-images", type=int, default=2000,
                        help="train images for the VAE's scaling_factor, test images for its PSNR")
    parser.add_argument("--max-megabytes", type=float, default=20.0, help="refuse parts larger than this (fp32)")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when sharing the cores)")
    parser.add_argument("--run-dir", default="runs/teacher-t2i")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    skip = ("resume", "overwrite", "run_dir", "threads")
    return "python scripts/train_teacher_t2i.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k not in skip)


def train_vae(args, run_dir: Path, deadline: float) -> tuple[torch.nn.Module, dict]:
    """Phase 1, or its saved result when a resumed run finished it already."""
    from diffusers import AutoencoderKL

    from vlkd.kernels import restore_attention

    final = run_dir / "vae-final"
    if args.resume and (final / "config.json").is_file():
        print(f"vae: phase 1 finished earlier; loading {final}")
        return AutoencoderKL.from_pretrained(final), json.loads((final / "vae.json").read_text())

    start = time.time()
    torch.manual_seed(args.seed)
    vae = build_vae(args.size, tuple(int(c) for c in args.vae_channels.split(",")), args.latent_channels)
    config = TrainConfig(steps=args.vae_steps, batch_size=args.vae_batch_size, lr=args.vae_lr, ema_decay=args.ema_decay,
                         lr_schedule="cosine", warmup_steps=min(100, args.vae_steps // 10), seed=args.seed,
                         checkpoint_every=args.checkpoint_every, max_grad_norm=1.0)
    dataset = build_dataset(f"shapes:{args.size}", split="train", seed=args.seed)
    budget = TimeBudget("vae", deadline, args.checkpoint_every)
    result, stopped = fit_in_time(AutoencoderLoss(args.kl_weight), vae, dataset, config, run_dir / "vae", budget,
                                  resume=args.resume and bool(list_checkpoints(run_dir / "vae")), desc="vae")
    vae = result.final_model().eval().requires_grad_(False)
    restore_attention(vae)

    train_pixels = torch.stack([dataset[i]["pixel_values"] for i in range(args.measure_images)])
    std = latent_std(vae, train_pixels, torch.Generator().manual_seed(args.seed))
    vae.register_to_config(scaling_factor=1.0 / std)
    test = build_dataset(f"shapes:{args.size}", split="test")
    count = min(args.measure_images, len(test))
    test_pixels = torch.stack([test[i]["pixel_values"] for i in range(count)])
    reconstructions = vae_reconstructions(vae, test_pixels)
    psnr = reconstruction_psnr(reconstructions, test_pixels)
    # PSNR is dominated by the flat background; whether a reconstruction keeps the figure's shape and colour is
    # what bounds the pipeline's prompt fidelity (a 31.6 dB VAE kept the shape in only 81% of test images).
    kept = prompt_fidelity(reconstructions, shapes_prompts(count), f"local-dir:{args.clip_teacher}")
    facts = {"optimizer_steps": result.steps, "planned_steps": args.vae_steps, "stopped_by_time_budget": stopped,
             "seconds_per_step": budget.seconds_per_step, "minutes": round((time.time() - start) / 60, 1),
             "final_loss": result.history[-1] if result.history else None, "latent_std": std,
             "scaling_factor": 1.0 / std, "reconstruction_psnr_db": round(psnr, 2),
             "reconstruction_fidelity": {key: kept[key] for key in ("fidelity", "shape_accuracy", "color_accuracy")},
             "psnr_images": f"shapes:{args.size} test split, first {count} images, posterior mean, uint8"}
    with staged_folder(final, overwrite=True) as folder:
        vae.save_pretrained(folder, safe_serialization=True)
        write_json(folder / "vae.json", facts)
    print(f"vae: {result.steps} steps, test PSNR {psnr:.2f} dB, reconstruction prompt fidelity {kept['fidelity']:.3f}, "
          f"latent std {std:.4f} -> scaling_factor {1 / std:.4f}")
    return vae, facts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    deadline = start + (args.minutes - EXPORT_MINUTES) * 60
    check_output(args.out, args.overwrite)  # before any training, not after it
    run_dir = Path(args.run_dir)
    started = [p for p in (run_dir / "vae-final", *list_checkpoints(run_dir / "vae"),
                           *list_checkpoints(run_dir / "unet")) if p.exists()]
    if args.resume and not started:
        sys.exit(f"error: --resume: {run_dir} holds no checkpoint of this script; run without --resume")
    if not args.resume and started:
        sys.exit(f"error: {run_dir} holds an earlier run ({started[0]}); pass --resume to continue it or choose "
                 "another --run-dir")

    from diffusers import StableDiffusionPipeline

    from vlkd.clip.models import load_teacher
    from vlkd.kernels import restore_attention

    clip = load_teacher(args.clip_teacher)
    text_encoder, tokenizer = text_encoder_from_clip(clip)
    test = build_dataset(f"shapes:{args.size}", split="test")
    captions = sorted({test[i]["caption"] for i in range(len(test))}) + [""]
    text_difference = text_encoder_difference(clip, text_encoder, tokenizer, captions)
    if text_difference > TEXT_TOLERANCE:
        sys.exit(f"error: the converted text encoder differs from {args.clip_teacher} by {text_difference:.2e}")
    context = text_encoder.config.hidden_size

    latent_size = args.size // 2 ** (len(args.vae_channels.split(",")) - 1)
    unet_channels = tuple(int(c) for c in args.unet_channels.split(","))
    torch.manual_seed(args.seed)
    unet = build_unet(latent_size, unet_channels, context, args.latent_channels, args.layers_per_block, args.heads,
                      args.top_attention)
    sizes = {"text_encoder": parameters(text_encoder), "unet": parameters(unet),
             "vae": parameters(build_vae(args.size, tuple(int(c) for c in args.vae_channels.split(",")),
                                         args.latent_channels))}
    megabytes = 4 * sum(sizes.values()) / 1e6
    if megabytes > args.max_megabytes:
        sys.exit(f"error: the parts hold {sum(sizes.values()):,} parameters ({megabytes:.1f} MB in fp32), over "
                 f"--max-megabytes {args.max_megabytes}; use fewer channels")
    print(f"parts: {sizes} parameters, {megabytes:.1f} MB in fp32; text encoder matches open_clip within "
          f"{text_difference:.1e}")
    print(f"time budget: phase 1 (VAE, {args.vae_steps} steps) at most {args.vae_minutes:g} min; the whole run at "
          f"most {args.minutes:g} min ({EXPORT_MINUTES:g} kept for measuring and saving); threads {args.threads}")

    vae, vae_facts = train_vae(args, run_dir, min(deadline, start + args.vae_minutes * 60))

    unet_start = time.time()
    scheduler = build_scheduler()
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                         lr_schedule="cosine", warmup_steps=min(200, args.steps // 10), seed=args.seed,
                         checkpoint_every=args.checkpoint_every, max_grad_norm=1.0)
    dataset = build_dataset(f"shapes:{args.size}", split="train", seed=args.seed)
    frozen = FrozenParts(vae, text_encoder, tokenizer)
    budget = TimeBudget("unet", deadline, args.checkpoint_every)
    print(f"unet: {args.steps} steps planned, {(deadline - time.time()) / 60:.1f} min left for them")
    result, stopped = fit_in_time(TextToImageDenoisingLoss(NoiseSchedule(scheduler.config), args.caption_dropout),
                                  unet, dataset, config, run_dir / "unet", budget, teacher=frozen,
                                  resume=args.resume and bool(list_checkpoints(run_dir / "unet")), desc="unet")
    unet_minutes = (time.time() - unet_start) / 60
    final = result.final_model().eval()
    for part in (final, vae, text_encoder):
        restore_attention(part)

    with staged_folder(args.out, overwrite=args.overwrite) as folder:
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=final,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipeline.save_pretrained(folder, safe_serialization=True)
        save_tokenizer(tokenizer, folder / "tokenizer")
        size = folder_megabytes(folder)
        minutes = (time.time() - start) / 60
        write_json(folder / "training.json", {
            "data": f"shapes:{args.size} train stream (seed {args.seed}), drawn on the fly; PSNR on the test split",
            "parts": {
                "text_encoder": {
                    "class": "CLIPTextModel", "parameters": sizes["text_encoder"], "frozen": True,
                    "from": f"{args.clip_teacher} (open_clip text tower, converted by vlkd.clip.export)",
                    "max_abs_difference_vs_open_clip": text_difference,
                    "tokenizer": f"CLIPTokenizer, each caption word one BPE token, {len(tokenizer)} ids, "
                                 f"context {tokenizer.model_max_length}"},
                "vae": {"class": "AutoencoderKL", "parameters": sizes["vae"],
                        "block_out_channels": [int(c) for c in args.vae_channels.split(",")],
                        "latent_shape": [args.latent_channels, latent_size, latent_size],
                        "loss": f"L1 + L2 + {args.kl_weight:g} x KL per latent element",
                        "batch_size": args.vae_batch_size, "lr": args.vae_lr, **vae_facts},
                "unet": {"class": "UNet2DConditionModel", "parameters": sizes["unet"],
                         "block_out_channels": list(unet_channels), "layers_per_block": args.layers_per_block,
                         "down_block_types": list(final.config.down_block_types),
                         "attention_heads": args.heads, "cross_attention_dim": context,
                         "optimizer_steps": result.steps, "planned_steps": args.steps,
                         "stopped_by_time_budget": stopped, "batch_size": args.batch_size, "lr": args.lr,
                         "lr_schedule": "cosine", "ema_decay": args.ema_decay,
                         "caption_dropout": args.caption_dropout, "seconds_per_step": budget.seconds_per_step,
                         "minutes": round(unet_minutes, 1),
                         "final_loss": result.history[-1] if result.history else None},
                "scheduler": {"class": "DDPMScheduler", **{k: scheduler.config[k] for k in (
                    "num_train_timesteps", "prediction_type", "beta_schedule", "beta_start", "beta_end")}},
            },
            "folder_megabytes": round(size, 2), "seed": args.seed, "training_minutes": round(minutes, 1),
            "time_budget_minutes": {"whole_run": args.minutes, "vae": args.vae_minutes},
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "command": command_line(args),
        })
    print(f"wrote {args.out} ({size:.1f} MB) after {vae_facts['optimizer_steps']} VAE and {result.steps} UNet "
          f"steps in {minutes:.1f} min")


if __name__ == "__main__":
    main()
