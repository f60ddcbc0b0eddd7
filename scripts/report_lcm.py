"""Quality of the shapes LCM and LCM-LoRA students against their teacher, read from the runs' own evaluations.

    vlkd distill pipelines/lcm-shapes.yaml
    vlkd distill pipelines/lcm-lora-shapes.yaml
    python scripts/report_lcm.py          # writes benchmarks/lcm-shapes.md and benchmarks/lcm-shapes.json
    python scripts/report_lcm.py --keep LCM-LoRA   # only the LCM recipe was rerun: LCM-LoRA's rows stay as reported

Each run's ``vlkd.json`` holds the metrics its ``eval`` section measured: one image per shapes test caption, Inception
FID against the 2,000 test images, prompt fidelity judged by the shapes CLIP teacher. The teacher's rows come from
``assets/teachers/t2i-shapes/metrics.json``, which ``scripts/evaluate_teacher.py`` measured with the same captions,
reference, sample count and per-batch seeds (so that the teacher and the LCM student start from the same noise);
this script refuses to compare rows measured differently. The last row, "real
latents", is what the teacher's decoder alone keeps: the captions' own test images encoded and decoded by its
VAE; every sample passes through that decoder. The file ends with the bars of issue 7, each computed from the rows
above it.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from vlkd.bench import script_command
from vlkd.files import atomic_file, write_json
from vlkd.train import describe_clock

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "assets" / "teachers" / "t2i-shapes"
RUNS = {"LCM": REPO / "runs" / "lcm-shapes", "LCM-LoRA": REPO / "runs" / "lcm-lora-shapes"}
OUTPUT = REPO / "benchmarks" / "lcm-shapes.md"
SAME = ("features", "num_samples", "num_reference", "reference")  # what makes two rows comparable


def rows_of(name: str, folder: Path) -> tuple[list[dict], dict]:
    """A student run's metric rows, named, and the facts of its run (steps, minutes, the seeds of its batches)."""
    from vlkd.eval.sources import batch_seeds

    info = json.loads((folder / "vlkd.json").read_text())
    rows = [{**row, "model": name, "sampler": "LCMScheduler", "guidance_scale": info["guidance_scale"]}
            for row in info["metrics"]]
    if not rows or any("fidelity" not in row for row in rows):
        raise SystemExit(f"{folder}/vlkd.json has no prompt-fidelity rows: run its recipe with eval.fidelity: true")
    seeds = batch_seeds(0, info["recipe"]["eval"]["num_samples"], info["recipe"]["eval"]["batch_size"])
    return rows, {"run": str(folder.relative_to(REPO)), **info["training"], "batch_seeds": seeds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--keep", choices=sorted(RUNS), action="append", default=[],
                        help="take this student's rows and run from the report already at --out (its .json) instead "
                             "of its run folder, when only the other recipe was rerun")
    args = parser.parse_args(argv)
    earlier_path = args.out.with_suffix(".json")
    if args.keep and not earlier_path.is_file():
        raise SystemExit(f"--keep {args.keep[0]}: there is no earlier report {earlier_path} to keep its rows from")
    earlier = json.loads(earlier_path.read_text()) if args.keep else {}

    metrics = json.loads((TEACHER / "metrics.json").read_text())
    teacher = {row["steps"]: {**row, "model": "teacher", "sampler": row["sampler"].upper()} for row in metrics["rows"]}
    students, runs = {}, {}
    for name, folder in RUNS.items():
        if name in args.keep:  # measured by the same code in an earlier run; the SAME check below still applies
            rows, runs[name] = earlier["students"][name], {**earlier["runs"][name], "kept": True}
        else:
            rows, runs[name] = rows_of(name, folder)
        students[name] = {row["steps"]: row for row in rows}
    every = [*teacher.values(), *(row for rows in students.values() for row in rows.values())]
    for row in every:
        if any(row[key] != every[0][key] for key in SAME):
            raise SystemExit(f"{row['model']} at {row['steps']} steps was measured with "
                             f"{ {key: row[key] for key in SAME} }, the teacher with "
                             f"{ {key: every[0][key] for key in SAME} }: rerun it with the recipe's eval section")

    # The DDIM-4 bars pit the LCM student against the teacher image by image: both must start from the same noise.
    if "batch_seeds" not in metrics:
        raise SystemExit(f"{TEACHER}/metrics.json predates per-batch seeds, so its rows and the students' start from "
                         "different noise: rerun scripts/evaluate_teacher.py t2i --guidance-from on it")
    if runs["LCM"].get("batch_seeds") != metrics["batch_seeds"]:
        raise SystemExit(f"the LCM run's evaluation drew its batches from seeds {runs['LCM'].get('batch_seeds')}, the "
                         f"teacher's from {metrics['batch_seeds']}: evaluate both at the same batch size")

    best, ddim4 = teacher[25], teacher[4]
    lcm, lora = students["LCM"][4], students["LCM-LoRA"][4]
    bars = [
        ("LCM 4-step prompt fidelity >= 0.9x the teacher's at 25 steps", lcm["fidelity"] >= 0.9 * best["fidelity"],
         f"{lcm['fidelity']:.3f} vs {0.9 * best['fidelity']:.3f}"),
        ("LCM 4-step FID <= 1.5x the teacher's at 25 steps", lcm["fd"] <= 1.5 * best["fd"],
         f"{lcm['fd']:.2f} vs {1.5 * best['fd']:.2f}"),
        ("LCM 4-step prompt fidelity above the teacher's at 4 DDIM steps", lcm["fidelity"] > ddim4["fidelity"],
         f"{lcm['fidelity']:.3f} vs {ddim4['fidelity']:.3f}"),
        ("LCM 4-step FID below the teacher's at 4 DDIM steps", lcm["fd"] < ddim4["fd"],
         f"{lcm['fd']:.2f} vs {ddim4['fd']:.2f}"),
        ("LCM-LoRA 4-step prompt fidelity >= 0.8x the teacher's at 25 steps",
         lora["fidelity"] >= 0.8 * best["fidelity"], f"{lora['fidelity']:.3f} vs {0.8 * best['fidelity']:.3f}"),
    ]

    lines = [
        "# Shapes LCM and LCM-LoRA students against their teacher",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `{script_command('report_lcm.py', argv)}` (the rows: each run's own evaluation, and the "
        "teacher's metrics.json)",
        f"- every row: {every[0]['num_samples']:,} images, one per shapes test caption, {every[0]['features']} FID "
        f"against {every[0]['reference']} ({every[0]['num_reference']:,} images), prompt fidelity judged by "
        f"{metrics['judge']}",
    ]
    lines += [f"- {name}: `{run['run']}`, {run['optimizer_steps']:,} optimizer steps at batch {run['batch_size']}, "
              f"{describe_clock(run)}"
              + (" (its rows kept from the previous report; that run was not repeated)" if run.get("kept") else "")
              for name, run in runs.items()]
    lines += ["", "| model | sampler | steps | guidance scale | FID | prompt fidelity | shape | colour | s/image |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(teacher.values(), key=lambda row: -row["steps"]) + [
            row for rows in students.values() for _, row in sorted(rows.items())]:
        lines.append(f"| {row['model']} | {row['sampler']} | {row['steps']} | {row['guidance_scale']:g} | "
                     f"{row['fd']:.2f} | {row['fidelity']:.3f} | {row['shape_accuracy']:.3f} | "
                     f"{row['color_accuracy']:.3f} | {row['seconds_per_image']:.4f} |")
    for row in metrics.get("vae_ceiling", [])[:1]:  # the first feature space is the one every row above uses
        if all(row[key] == every[0][key] for key in SAME):
            lines.append(f"| real latents (VAE reconstructions of the test images) | - | - | - | {row['fd']:.2f} | "
                         f"{row['fidelity']:.3f} | {row['shape_accuracy']:.3f} | {row['color_accuracy']:.3f} | - |")
    lines += [""] + [f"- {text}: **{'yes' if met else 'no'}** ({values})" for text, met, values in bars]
    # One seed decides little when FID at 1,000 images moves from seed to seed by more than the gap.
    lines += ["", f"The teacher's rows and the LCM student's start from the same noise (batch i from seed "
              f"{metrics['batch_seeds'][0]} + i); `python scripts/bench_lcm_seeds.py` repeats the 4-step comparison "
              "over several seeds (benchmarks/lcm-shapes-seeds.md)."]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_file(args.out, "w") as handle:
        handle.write(text)
    write_json(args.out.with_suffix(".json"), {
        "teacher": list(teacher.values()), "students": {name: list(rows.values()) for name, rows in students.items()},
        "vae_ceiling": metrics.get("vae_ceiling", []), "runs": runs,
        "bars": [{"bar": text, "met": met, "values": values} for text, met, values in bars]})


if __name__ == "__main__":
    main()
