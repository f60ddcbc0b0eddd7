"""Measure a shipped teacher and write its model card (README.md) and metrics.json into its folder.

    python scripts/evaluate_teacher.py ddpm assets/teachers/ddpm-digits     # ~30 min on 2 cores
    python scripts/evaluate_teacher.py clip assets/teachers/clip-shapes     # ~1 min

DDPM: Inception FID and digits-classifier FD of 1,000 samples against all 1,797 digits, for DDIM at 1-256 steps
and DPM-Solver++ (2M) at 1-8 steps in its best configuration, chosen among ``DPM_SOLVER_CANDIDATES`` by the
digits-classifier FD at 4 steps; a second sampling seed at one step count gives the run-to-run noise.
CLIP: zero-shot top-1/top-5 on the 2,000 shapes test images per task, tower parameters, image-encoding latency.
Both files are written atomically; everything else in the folder is left as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from vlkd.files import atomic_file, write_json

DDIM_STEPS = (1, 2, 4, 8, 16, 64, 256)
DPM_STEPS = (1, 2, 4, 8)
NOISE_STEPS = 16  # the step count sampled with a second seed to measure run-to-run noise
METRICS = ("inception", "digits-classifier")
TASKS = ("shape", "color", "shape_color")


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


def ddpm_card(folder: Path, metrics: dict, training: dict) -> str:
    from vlkd.eval.frontier import frontier_table

    fid = {r["steps"]: r["fd"] for r in metrics["rows"] if r["sampler"] == "ddim" and r["features"] == "inception"}
    best_steps = min((16, 64, 256), key=fid.__getitem__)
    noise = metrics["run_to_run_noise"]
    return f"""# ddpm-digits: the shipped digits DDPM teacher

A diffusers `UNet2DModel` ({training['parameters']:,} parameters, channels {training['unet_channels']}) trained on
{training['data']} with a 1,000-step `DDPMScheduler` ({training['prediction_type']}, {training['beta_schedule']} betas)
and EMA weights (decay {training['ema_decay']}): {training['optimizer_steps']} steps at batch {training['batch_size']},
{training['training_minutes']} minutes on {training['machine']}.

Retrain: `{training['command']}`. Re-measure: `python scripts/evaluate_teacher.py ddpm {folder}`.

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
{training['optimizer_steps']} steps at batch {training['batch_size']}, {training['training_minutes']} minutes on
{training['machine']}.

Retrain: `{training['command']}`. Re-measure: `python scripts/evaluate_teacher.py clip {folder}`.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["ddpm", "clip"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--num", type=int, default=1000, help="samples per DDPM row")
    parser.add_argument("--reference", default="digits:16@all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dpm-from", type=Path, metavar="METRICS_JSON",
                        help="keep the DPM-Solver++ search and rows of this earlier metrics.json (DDPM only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    training = json.loads((args.folder / "training.json").read_text())
    if args.kind == "ddpm":
        dpm_from = json.loads(args.dpm_from.read_text()) if args.dpm_from else None
        metrics = evaluate_ddpm(args.folder, args.num, args.reference, dpm_from)
        card = ddpm_card(args.folder, metrics, training)
    else:
        metrics = evaluate_clip(args.folder)
        card = clip_card(args.folder, metrics, training)
    metrics["command"] = "python scripts/evaluate_teacher.py " + " ".join(sys.argv[1:])
    write_json(args.folder / "metrics.json", metrics)
    with atomic_file(args.folder / "README.md", "w") as handle:
        handle.write(card)
    print(card)


if __name__ == "__main__":
    main()
