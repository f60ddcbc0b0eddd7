"""Measure a shipped teacher and write its model card (README.md) and metrics.json into its folder.

    python scripts/evaluate_teacher.py ddpm assets/teachers/ddpm-digits     # ~30 min on 2 cores
    python scripts/evaluate_teacher.py clip assets/teachers/clip-shapes     # ~1 min
    python scripts/evaluate_teacher.py t2i assets/teachers/t2i-shapes       # ~20 min on 2 cores
    python scripts/evaluate_teacher.py t2i --guidance-from assets/teachers/t2i-shapes/metrics.json  # rows only

DDPM: Inception FID and digits-classifier FD of 1,000 samples against all 1,797 digits, for DDIM at 1-256 steps
and DPM-Solver++ (2M) at 1-8 steps in its best configuration, chosen among ``DPM_SOLVER_CANDIDATES`` by the
digits-classifier FD at 4 steps; a second sampling seed at one step count gives the run-to-run noise.
CLIP: zero-shot top-1/top-5 on the 2,000 shapes test images per task, tower parameters, image-encoding latency.
T2I: the first 1,000 shapes test captions, one image each, sampled with diffusers' DDIMScheduler (trailing spacing)
at 25 and 4 steps with the guidance scale chosen among ``T2I_GUIDANCE`` at 25 steps (``choose_guidance``, on
``--num-guidance-search`` captions); each setting sampled once and measured by Inception FID against all 2,000
shapes test images, prompt fidelity (``vlkd.eval.fidelity``) and seconds per image; the same measures of the VAE's
reconstructions of the real test images of those captions show what the decoder alone keeps.
Both files are written atomically; everything else in the folder is left as it is. ``--card-only`` rewrites the
card from the folder's stored metrics.json and training.json (after a change to the card's text), measuring nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from vlkd.bench import script_command
from vlkd.files import atomic_file, write_json
from vlkd.train import describe_clock

DDIM_STEPS = (1, 2, 4, 8, 16, 64, 256)
DPM_STEPS = (1, 2, 4, 8)
NOISE_STEPS = 16  # the step count sampled with a second seed to measure run-to-run noise
METRICS = ("inception", "digits-classifier")
TASKS = ("shape", "color", "shape_color")
T2I_GUIDANCE = (1.0, 2.0, 3.0, 5.0, 7.5)  # classifier-free guidance scales tried (pipeline convention, 1 = none)
T2I_STEPS = (25, 4)  # DDIM step counts measured at the chosen scale; the search runs at the first
T2I_PARTS = ("unet", "vae", "text_encoder")
REPRODUCTION = ("A retrain from scratch with the default seed, its time on 2 CPU threads and how closely it "
                "reproduces the figures below: `benchmarks/reproduction.md` (`scripts/report_reproduction.py`).")
DEFAULT_FOLDERS = {kind: Path("assets/teachers") / name
                   for kind, name in (("ddpm", "ddpm-digits"), ("clip", "clip-shapes"), ("t2i", "t2i-shapes"))}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}")


def evaluate_ddpm(folder: Path, num: int, reference: str, dpm_from: dict | None = None) -> dict:
    """The DDIM / DPM-Solver++ table of a DDPM teacher folder; ``dpm_from``: an earlier metrics.json of the same
    folder, sample count and reference whose DPM-Solver++ search and rows are kept instead of measured again."""
    from diffusers import DDPMPipeline

    from vlkd.eval.frontier import (DPM_SOLVER_CANDIDATES, best_dpm_solver, ddim_scheduler, dpm_solver_scheduler,
                                    measure, with_scheduler)
    from vlkd.recipes import EvalConfig

    pipeline = DDPMPipeline.from_pretrained(folder)
    config = EvalConfig(num_samples=num, features=list(METRICS), batch_size=250)
    started = time.time()
    # Trailing spacing starts DDIM at t = 999 (pure noise), as the distilled students do; diffusers' default
    # "leading" spacing ends the grid early (1 step samples at t = 0) and so mis-measures few-step sampling.
    ddim = with_scheduler(pipeline, ddim_scheduler(pipeline.scheduler.config, timestep_spacing="trailing"))
    rows = []
    for steps in DDIM_STEPS:  # one call per step count so that the log shows each figure as it lands
        rows += measure(ddim, [steps], config, reference, model="teacher", sampler="ddim")
        print(json.dumps(rows[-len(METRICS):]), flush=True)
    noise = measure(ddim, [NOISE_STEPS], config, reference, model="teacher", sampler="ddim", seed=1)
    if dpm_from is not None:
        if (dpm_from["num_samples"], dpm_from["reference"]) != (num, f"{reference} (1,797 images)"):
            raise SystemExit("--dpm-from: that metrics.json used another sample count or reference")
        best_name, search = dpm_from["dpm_solver"]["best"], dpm_from["dpm_solver"]["search"]
        rows += [row for row in dpm_from["rows"] if row["sampler"] == "dpm-solver++"]
    else:
        search_config = EvalConfig(num_samples=num, features=["digits-classifier"], batch_size=250)
        best_name, search = best_dpm_solver(pipeline, search_config, reference)
        solver = with_scheduler(pipeline, dpm_solver_scheduler(pipeline.scheduler.config,
                                                               **DPM_SOLVER_CANDIDATES[best_name]))
        rows += measure(solver, DPM_STEPS, config, reference, model="teacher", sampler="dpm-solver++")
    best = DPM_SOLVER_CANDIDATES[best_name]
    seed0 = {r["features"]: r["fd"] for r in rows if r["sampler"] == "ddim" and r["steps"] == NOISE_STEPS}
    return {
        "reference": f"{reference} (1,797 images)", "num_samples": num, "seed": 0, "rows": rows,
        "run_to_run_noise": {"what": f"DDIM-{NOISE_STEPS} sampled with seeds 0 and 1",
                             **{r["features"]: abs(seed0[r["features"]] - r["fd"]) for r in noise}},
        "dpm_solver": {"best": best_name, "settings": {"algorithm_type": "dpmsolver++", "solver_order": 2, **best},
                       "search": search, "search_metric": "digits-classifier FD at 4 steps",
                       "measured": dpm_from["dpm_solver"].get("measured", dpm_from["date"]) if dpm_from
                       else datetime.date.today().isoformat()},
        "ddim_settings": {"timestep_spacing": "trailing", "scheduler": "vlkd.eval.frontier.ddim_scheduler"},
        # An earlier run with diffusers' own DDIMScheduler, kept to show why the grid matters (see the card).
        "diffusers_ddim": ([r for r in dpm_from["rows"] if r["sampler"] == "ddim"]
                           if dpm_from and "scheduler" not in dpm_from.get("ddim_settings", {})
                           else dpm_from.get("diffusers_ddim") if dpm_from else None),
        "minutes": round((time.time() - started) / 60, 1), "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }


def training_time(training: dict) -> str:
    """How long the training took and where, as its training.json records it (a note on how it ran included)."""
    text = f"{describe_clock(training, 'training_minutes')} on {training['machine']}"
    return text + (f". How it ran: {training['note']}" if training.get("note") else "")


def ddpm_card(folder: Path, metrics: dict, training: dict) -> str:
    from vlkd.eval.frontier import frontier_table

    fid = {r["steps"]: r["fd"] for r in metrics["rows"] if r["sampler"] == "ddim" and r["features"] == "inception"}
    best_steps = min((16, 64, 256), key=fid.__getitem__)
    noise = metrics["run_to_run_noise"]
    return f"""# ddpm-digits: the shipped digits DDPM teacher

A diffusers `UNet2DModel` ({training['parameters']:,} parameters, channels {training['unet_channels']}) trained on
{training['data']} with a 1,000-step `DDPMScheduler` ({training['prediction_type']}, {training['beta_schedule']} betas)
and EMA weights (decay {training['ema_decay']}): {training['optimizer_steps']} steps at batch {training['batch_size']},
{training_time(training)}.

Retrain: `{training['command']}`. Re-measure: `python scripts/evaluate_teacher.py ddpm {folder}`.
{REPRODUCTION}

## Load it with diffusers alone

```python
from diffusers import DDIMPipeline, DDIMScheduler
pipe = DDIMPipeline.from_pretrained("{folder}")
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
images = pipe(batch_size=16, num_inference_steps=16, output_type="np").images  # (16, 16, 16, 1) in [0, 1]
```

## Measured ({metrics['date']}, {metrics['machine']})

{metrics['num_samples']:,} samples against {metrics['reference']}: Inception FID and the Fréchet distance in the
digits classifier's 128-d feature space (`assets/classifiers/digits-classifier`), and sampling seconds per image
at batch 250. DDIM uses trailing timestep spacing and steps from each grid point to the next
(`vlkd.eval.frontier.ddim_scheduler`).{_diffusers_ddim_note(metrics)} DPM-Solver++ (2M) uses the best of
{len(metrics['dpm_solver']['search'])} configurations at 4 steps: **{metrics['dpm_solver']['best']}**
(`{json.dumps(metrics['dpm_solver']['settings'])}`).

{frontier_table(metrics['rows'])}

Best DDIM FID over 16, 64 and 256 steps (the "teacher FID" students are judged against): **{fid[best_steps]:.2f}**
at {best_steps} steps. Run-to-run noise ({noise['what']}): FID {noise['inception']:.2f}, digits-classifier FD
{noise['digits-classifier']:.2f}.

DPM-Solver++ search ({metrics['dpm_solver']['search_metric']}):
{chr(10).join(f"- {name}: {value:.2f}" for name, value in metrics['dpm_solver']['search'].items())}
"""


def _diffusers_ddim_note(metrics: dict) -> str:
    """Why the DDIM rows use vlkd's grid stepping, from the earlier run with diffusers' DDIMScheduler, if kept."""
    rows = {r["steps"]: r["fd"] for r in metrics.get("diffusers_ddim") or [] if r["features"] == "inception"}
    if not {16, 64, 256} <= set(rows):
        return ""
    return (" diffusers' `DDIMScheduler` steps from t to t - 1000 // K instead, which is off the trailing grid when "
            "K does not divide 1,000 (spacing 15.6 at 64 steps, 3.9 at 256): each step lands up to one timestep "
            "short of where the next model call assumes it is. Measured with it on this teacher: FID "
            f"{rows[16]:.2f} at 16 steps, {rows[64]:.2f} at 64, {rows[256]:.2f} at 256; students exported with "
            "1, 2, 4 or 8 steps are unaffected (K divides 1,000).")


def evaluate_clip(folder: Path) -> dict:
    """Zero-shot per shapes task, parameters and image-encoding latency of an open_clip teacher folder."""
    from vlkd.eval.speed import image_encoder_latency
    from vlkd.eval.zeroshot import load_clip, zero_shot

    clip = load_clip(f"local-dir:{folder}", device="cpu")
    visual = sum(p.numel() for p in clip.model.visual.parameters())
    total = sum(p.numel() for p in clip.model.parameters())
    started = time.time()
    tasks = {task: zero_shot(clip, f"shapes:32:{task}@test", batch_size=500) for task in TASKS}
    latency = image_encoder_latency(clip, batch_size=64)
    return {
        "dataset": "shapes:32 test split (2,000 images)", "zero_shot": tasks,
        "parameters": {"image_tower": visual, "text_tower": total - visual - 1, "total": total},
        "image_encoding": {"batch_size": 64, "ms_per_batch": round(latency["median_s"] * 1000, 2),
                           "images_per_s": round(latency["images_per_s"], 1)},
        "minutes": round((time.time() - started) / 60, 2), "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }


def clip_card(folder: Path, metrics: dict, training: dict) -> str:
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    rows = "\n".join(f"| {task} | {r['num_classes']} | {percent(r['top1'])} | {percent(r['top5'])} | "
                     f"{percent(r['mean_per_class_recall'])} |" for task, r in metrics["zero_shot"].items())
    p = metrics["parameters"]
    return f"""# clip-shapes: the shipped shapes CLIP teacher

An open_clip CLIP from a custom config (ViT image tower for 32x32 input, {p['image_tower']:,} parameters; text
tower with a word-level tokenizer, {p['text_tower']:,} parameters) trained contrastively on {training['data']}:
{training['optimizer_steps']} steps at batch {training['batch_size']}, {training_time(training)}.

Retrain: `{training['command']}`. Re-measure: `python scripts/evaluate_teacher.py clip {folder}`.
{REPRODUCTION}

## Load it with open_clip alone

```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")
tokenizer = open_clip.get_tokenizer("local-dir:{folder}")
text = tokenizer(["a drawing of a red star.", "a drawing of a blue circle."])
```

Inputs are 32x32 RGB normalised with mean = std = 0.5 (vlkd's [-1, 1] pixels as they are).

## Measured ({metrics['date']}, {metrics['machine']})

Zero-shot on {metrics['dataset']}, prompts from `assets/datasets/shapes.json`:

| task | classes | top-1 % | top-5 % | mean per-class recall % |
|---|---|---|---|---|
{rows}

Image encoding at batch {metrics['image_encoding']['batch_size']}: {metrics['image_encoding']['ms_per_batch']} ms
({metrics['image_encoding']['images_per_s']} images/s).
"""


def measure_t2i(pipeline: Any, steps: int, guidance_scale: float, prompts: Any, *, extractors: list[Any],
                reference: str, judge: Any, batch_size: int = 250) -> list[dict]:
    """One PipelineSource of ``prompts.captions`` (image i from caption i) under DDIM, sampled once: one row per
    feature space with FD against ``reference`` (all of it), prompt fidelity and sampling seconds per image."""
    from vlkd.eval.frontier import diffusers_ddim
    from vlkd.eval.sources import PipelineSource

    source = PipelineSource(pipeline, len(prompts.captions), steps=steps, prompts=prompts.captions,
                            guidance_scale=guidance_scale, scheduler=diffusers_ddim(pipeline), seed=0, progress=False)
    images = torch.cat(list(source.batches(batch_size)))
    return measured_rows(images, prompts, {"model": "teacher", "sampler": "ddim", "steps": steps,
                                           "guidance_scale": guidance_scale}, extractors=extractors,
                         reference=reference, judge=judge, batch_size=batch_size,
                         seconds_per_image=source.seconds_per_image)


def measured_rows(images: torch.Tensor, prompts: Any, fields: dict, *, extractors: list[Any], reference: str,
                  judge: Any, batch_size: int, **extra: Any) -> list[dict]:
    """One row per feature space for uint8 ``images`` (image i for caption i): ``fields``, FD against all of
    ``reference``, prompt fidelity, then ``extra``."""
    from vlkd.diffusion.evaluate import fidelity_fields
    from vlkd.eval.fid import fid
    from vlkd.eval.sources import TensorSource

    faithful = fidelity_fields(images, prompts, judge, batch_size)
    rows = []
    for extractor in extractors:
        result = fid(TensorSource(images), reference, features=extractor, num=len(images), batch_size=batch_size)
        rows.append({**fields, "features": result.extractor, "fd": result.value, "num_samples": result.num_a,
                     "num_reference": result.num_b, "reference": reference, **extra, **faithful})
    return rows


def measure_vae_ceiling(pipeline: Any, prompts: Any, *, extractors: list[Any], reference: str, judge: Any,
                        batch_size: int = 250) -> list[dict]:
    """The real shapes test images of ``prompts`` encoded by the pipeline's VAE to their posterior mean and decoded,
    measured as samples are (one row per feature space): what the decoder, which every sample passes through, makes
    of real images."""
    from vlkd.data.builtin_shapes import shapes_test_set
    from vlkd.diffusion.t2i_build import vae_reconstructions

    size = pipeline.vae.config.sample_size
    pixels = shapes_test_set(size).pixels[:len(prompts.captions)].movedim(-1, -3).float() / 127.5 - 1
    images = vae_reconstructions(pipeline.vae, pixels, batch_size)
    return measured_rows(images, prompts, {"model": "vae reconstruction"}, extractors=extractors,
                         reference=reference, judge=judge, batch_size=batch_size)


def choose_guidance(search: list[dict]) -> float:
    """The guidance scale of the search row with the lowest FD among those whose prompt fidelity is within one
    binomial standard error of the best: guidance is there to follow the prompt, and among scales that follow it
    equally well (as far as the sample count can tell) the one whose images look most like the data wins."""
    best = max(row["fidelity"] for row in search)
    error = math.sqrt(best * (1 - best) / search[0]["num_samples"])
    faithful = [row for row in search if row["fidelity"] >= best - error]
    return min(faithful, key=lambda row: row["fd"])["guidance_scale"]


def evaluate_t2i(folder: Path, num: int, num_search: int, reference: str, *, scales: tuple[float, ...] = T2I_GUIDANCE,
                 features: tuple[str, ...] = ("inception",), judge: Any = None, batch_size: int = 250,
                 guidance_from: dict | None = None) -> dict:
    """Guidance search at ``T2I_STEPS[0]`` DDIM steps on ``num_search`` captions (FD in the first of ``features``),
    then every ``T2I_STEPS`` count at the chosen scale on ``num`` captions, of a StableDiffusionPipeline folder.
    ``guidance_from``: an earlier metrics.json of the folder whose search and chosen scale are kept instead."""
    from diffusers import StableDiffusionPipeline

    from vlkd.eval.fidelity import load_judge
    from vlkd.eval.fid import get_extractor
    from vlkd.eval.fidelity import shapes_prompts
    from vlkd.eval.sources import batch_seeds

    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    extractors = [get_extractor(name) for name in features]
    judge_name = "the shipped shapes CLIP teacher, assets/teachers/clip-shapes" if judge is None else str(judge)
    judge = load_judge(judge)
    started = time.time()
    if guidance_from is not None:
        # The students were distilled and evaluated at the scale chosen then; a new search would reopen that choice.
        guidance = {**guidance_from["guidance"],
                    "measured": guidance_from["guidance"].get("measured", guidance_from["date"])}
    else:
        search_prompts = shapes_prompts(num_search)
        search = []
        for scale in scales:  # one call per scale so that the log shows each figure as it lands
            search += measure_t2i(pipeline, T2I_STEPS[0], scale, search_prompts, extractors=extractors[:1],
                                  reference=reference, judge=judge, batch_size=batch_size)
            print(json.dumps(search[-1]), flush=True)
        guidance = {"chosen": choose_guidance(search), "steps": T2I_STEPS[0], "num_samples": num_search,
                    "search": search, "measured": datetime.date.today().isoformat(),
                    "rule": "lowest FD among scales whose fidelity is within one binomial standard error of the "
                            "best (scripts/evaluate_teacher.py choose_guidance)"}
    chosen = guidance["chosen"]
    prompts, rows = shapes_prompts(num), []
    for steps in T2I_STEPS:
        rows += measure_t2i(pipeline, steps, chosen, prompts, extractors=extractors, reference=reference,
                            judge=judge, batch_size=batch_size)
        print(json.dumps(rows[-1]), flush=True)
    ceiling = measure_vae_ceiling(pipeline, prompts, extractors=extractors, reference=reference, judge=judge,
                                  batch_size=batch_size)
    print(json.dumps(ceiling[-1]), flush=True)
    parameters = {part: sum(p.numel() for p in getattr(pipeline, part).parameters()) for part in T2I_PARTS}
    return {
        "reference": f"{reference} (all {rows[0]['num_reference']:,} images)", "num_samples": num, "seed": 0,
        # Batch i of every row starts from this seed (vlkd.eval.sources.batch_seeds), as the students' evaluations.
        "batch_seeds": batch_seeds(0, num, batch_size),
        "prompts": f"the first {num:,} shapes test captions (vlkd.eval.fidelity.shapes_prompts), one image each",
        "judge": judge_name, "rows": rows, "vae_ceiling": ceiling,
        "guidance": guidance,
        "ddim_settings": {"scheduler": "diffusers.DDIMScheduler.from_config(pipe.scheduler.config, "
                                       "timestep_spacing='trailing')", "timestep_spacing": "trailing", "eta": 0.0},
        "parameters": {**parameters, "total": sum(parameters.values())},
        "minutes": round((time.time() - started) / 60, 1), "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }


def _t2i_table(rows: list[dict], ceiling: list[dict] = ()) -> str:
    """Markdown rows: steps, guidance, FD per feature space, prompt fidelity (both, shape, colour) in %, s/image;
    the VAE ceiling rows (``measure_vae_ceiling``) last, as "real latents"."""
    features = list(dict.fromkeys(row["features"] for row in rows))
    header = ["DDIM steps", "guidance", *("FID" if f == "inception" else f"FD {f}" for f in features),
              "fidelity %", "shape %", "colour %", "s/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    points: dict[tuple[int, float], dict[str, dict]] = {}
    for row in rows:
        points.setdefault((row["steps"], row["guidance_scale"]), {})[row["features"]] = row
    for (steps, scale), by_feature in points.items():
        first = next(iter(by_feature.values()))
        cells = [str(steps), f"{scale:g}",
                 *(f"{by_feature[f]['fd']:.2f}" if f in by_feature else "-" for f in features),
                 *(f"{100 * first[key]:.1f}" for key in ("fidelity", "shape_accuracy", "color_accuracy")),
                 f"{first['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if ceiling:
        by_feature = {row["features"]: row for row in ceiling}
        first = ceiling[0]
        cells = ["real latents", "-", *(f"{by_feature[f]['fd']:.2f}" if f in by_feature else "-" for f in features),
                 *(f"{100 * first[key]:.1f}" for key in ("fidelity", "shape_accuracy", "color_accuracy")), "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kept(vae: dict) -> str:
    """", prompt fidelity of its reconstructions N%" from training.json (absent in folders trained before it)."""
    kept = vae.get("reconstruction_fidelity")
    return f", prompt fidelity of its reconstructions {100 * kept['fidelity']:.1f}%" if kept else ""


def _attention_levels(unet: dict) -> str:
    """", down blocks A, B, ..." from training.json (absent in folders trained before it recorded them)."""
    blocks = unet.get("down_block_types")
    return f", down blocks {', '.join(blocks)} (and a cross-attention middle)" if blocks else ""


def _seeding(metrics: dict) -> str:
    """How the rows' noise was drawn, from metrics.json (absent in runs before batches were seeded one by one)."""
    seeds = metrics.get("batch_seeds")
    return (f"\nBatch i starts from seed {seeds[0]} + i (seeds {', '.join(map(str, seeds))}), as in the distilled "
            "students'\nevaluations, so their rows and these start from the same noise." if seeds else "")


def t2i_card(folder: Path, metrics: dict, training: dict) -> str:
    parts, p = training["parts"], metrics["parameters"]
    unet, vae, text, scheduler = parts["unet"], parts["vae"], parts["text_encoder"], parts["scheduler"]
    guidance = metrics["guidance"]
    chosen = guidance["chosen"]
    latents = "x".join(map(str, vae["latent_shape"]))
    parts_table = "\n".join([
        "| part | class | parameters | what |", "|---|---|---:|---|",
        f"| text encoder | `{text['class']}` | {p['text_encoder']:,} | frozen: {text['from']}; {text['tokenizer']} |",
        f"| VAE | `{vae['class']}` | {p['vae']:,} | channels {vae['block_out_channels']}, latents {latents}, scaling "
        f"factor {vae['scaling_factor']:.4f}, reconstruction PSNR {vae['reconstruction_psnr_db']} dB"
        f"{_kept(vae)} ({vae['psnr_images']}) |",
        f"| UNet | `{unet['class']}` | {p['unet']:,} | channels {unet['block_out_channels']}, "
        f"{unet['layers_per_block']} layer(s) per block{_attention_levels(unet)}, {unet['attention_heads']} "
        f"attention heads, cross-attention width {unet['cross_attention_dim']} |",
        f"| scheduler | `{scheduler['class']}` | - | {scheduler['num_train_timesteps']} steps, "
        f"{scheduler['prediction_type']}, {scheduler['beta_schedule']} betas {scheduler['beta_start']} to "
        f"{scheduler['beta_end']} |",
    ])
    return f"""# t2i-shapes: the shipped text-to-image teacher

A small Stable-Diffusion-style latent diffusion pipeline (diffusers `StableDiffusionPipeline`) for 32x32 images of
coloured shapes from captions such as "a small red star in the top left corner": the teacher of the guided
pipelines `pipelines/lcm-shapes.yaml` (LCM) and `pipelines/lcm-lora-shapes.yaml` (LCM-LoRA).
Data: {training['data']}.

{parts_table}

Total {p['total']:,} parameters. Training: the VAE for {vae['optimizer_steps']} steps at batch
{vae['batch_size']} ({vae['loss']}), then the UNet for {unet['optimizer_steps']} steps at batch
{unet['batch_size']} (lr {unet['lr']}, {unet['lr_schedule']}, EMA {unet['ema_decay']}, captions dropped with
probability {unet['caption_dropout']} for classifier-free guidance): {training_time(training)}.

Retrain: `{training['command']}`. Re-measure: `python scripts/evaluate_teacher.py t2i {folder}`.

## Load it with diffusers alone

```python
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{folder}")
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
images = pipe(["a small red star in the top left corner"] * 4, num_inference_steps=25, guidance_scale={chosen:g},
              generator=torch.Generator().manual_seed(0), output_type="np").images  # (4, 32, 32, 3) in [0, 1]
```

## Measured ({metrics['date']}, {metrics['machine']})

The first {metrics['num_samples']:,} shapes test captions, one image each, sampled with diffusers' `DDIMScheduler`
(eta 0) at the chosen guidance scale **{chosen:g}**, against {metrics['reference']}: the Fréchet distance
(Inception: FID), prompt fidelity and sampling seconds per image at batch 250.{_seeding(metrics)}
An image is faithful when its
shape and its colour, each judged zero-shot by {metrics['judge']}, both match its caption; the shape and colour
columns count each alone. Compare FID only at equal sample counts.

{_t2i_table(metrics['rows'], metrics.get('vae_ceiling', ()))}

"Real latents" is what the decoder alone keeps: the same {metrics['num_samples']:,} test images whose captions the
samples above were drawn for, encoded by the VAE to their posterior mean and decoded. Every sample passes through
that decoder, so a sampler scoring close to this row is limited by the VAE rather than by its steps. It is not a
strict bound: generated images need not be as varied as real ones, and can score above it.

DDIM uses trailing timestep spacing: its grid starts at t = 999, where sampling starts from pure noise, and because
25 and 4 divide 1,000, diffusers' step from t to t - 1000 // K lands exactly on the next grid point. The folder's
own scheduler config says "leading" (Stable Diffusion's default, with steps_offset 1), whose grid starts at
t = 961 for 25 steps and at t = 751 for 4: sampling would begin from pure noise at a timestep where the model
expects a partly denoised latent, which penalises few-step sampling (Lin et al. 2024, "Common Diffusion Noise
Schedules and Sample Steps are Flawed"). The distilled LCM students also start at t = 999.

Guidance scale search ({guidance.get('measured', metrics['date'])}) at {guidance['steps']} steps on the first
{guidance['num_samples']:,} captions; chosen:
**{chosen:g}**, the {guidance['rule']}.

{_t2i_table(guidance['search'])}
"""


def measure(args: argparse.Namespace, folder: Path) -> dict:
    """The teacher's metrics.json, measured now."""
    if args.kind == "ddpm":
        dpm_from = json.loads(args.dpm_from.read_text()) if args.dpm_from else None
        metrics = evaluate_ddpm(folder, args.num, args.reference or "digits:16@all", dpm_from)
    elif args.kind == "t2i":
        scales = tuple(float(w) for w in args.guidance_scales.split(","))
        guidance_from = json.loads(args.guidance_from.read_text()) if args.guidance_from else None
        metrics = evaluate_t2i(folder, args.num, args.num_guidance_search, args.reference or "shapes:32@test",
                               scales=scales, features=tuple(args.features.split(",")), guidance_from=guidance_from)
    else:
        metrics = evaluate_clip(folder)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=list(DEFAULT_FOLDERS))
    parser.add_argument("folder", type=Path, nargs="?", help="the teacher folder (default: the shipped one)")
    parser.add_argument("--num", type=int, default=1000, help="samples per DDPM or T2I row")
    parser.add_argument("--reference", help="FD reference (default: digits:16@all for ddpm, shapes:32@test for t2i)")
    parser.add_argument("--num-guidance-search", type=int, default=300, help="samples per guidance scale (T2I)")
    parser.add_argument("--guidance-scales", default=",".join(f"{w:g}" for w in T2I_GUIDANCE),
                        help="comma-separated guidance scales searched (T2I)")
    parser.add_argument("--features", default="inception",
                        help="comma-separated FD feature spaces, the first one choosing the guidance (T2I)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite the model card from the folder's metrics.json and training.json, measuring nothing")
    parser.add_argument("--dpm-from", type=Path, metavar="METRICS_JSON",
                        help="keep the DPM-Solver++ search and rows of this earlier metrics.json (DDPM only)")
    parser.add_argument("--guidance-from", type=Path, metavar="METRICS_JSON",
                        help="keep the guidance search and chosen scale of this earlier metrics.json (T2I only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = args.folder or DEFAULT_FOLDERS[args.kind]
    training = json.loads((folder / "training.json").read_text())
    cards = {"ddpm": ddpm_card, "clip": clip_card, "t2i": t2i_card}
    if args.card_only:
        if not (folder / "metrics.json").is_file():
            raise SystemExit(f"--card-only: {folder} has no metrics.json to write the card from; measure it first "
                             "(the same command without --card-only)")
        metrics = json.loads((folder / "metrics.json").read_text())
    else:
        metrics = measure(args, folder)
        metrics["command"] = script_command("evaluate_teacher.py", argv)
        write_json(folder / "metrics.json", metrics)
    card = cards[args.kind](folder, metrics, training)
    with atomic_file(folder / "README.md", "w") as handle:
        handle.write(card)
    print(card)


if __name__ == "__main__":
    main()
