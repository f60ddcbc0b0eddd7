"""Seed-to-seed spread of the shapes LCM student against the teacher's DDIM at the same step count.

    vlkd distill pipelines/lcm-shapes.yaml
    python scripts/bench_lcm_seeds.py      # writes benchmarks/lcm-shapes-seeds.md and benchmarks/lcm-shapes-seeds.json

Issue 7 compares the 4-step student with the teacher's 4-step DDIM on one evaluation (seed 0). Here both are
sampled by the same function (``vlkd.diffusion.evaluate.evaluate_pipeline``, the one the recipe's evaluation runs),
from the same initial noise for each seed, on 1,000 shapes test captions, one image each: Inception FID against the
2,000 test images and prompt fidelity judged by the shapes CLIP teacher. The table gives each seed's figures, the
paired student-minus-teacher differences, and their means and standard deviations, so that a gap between the two
can be told from sampling noise. The teacher samples with diffusers' DDIMScheduler, trailing spacing, at the
guidance scale its metrics.json chose; the student with its own LCMScheduler at the scale its vlkd.json records.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "benchmarks" / "lcm-shapes-seeds.md"
REFERENCE = "shapes:32@test"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, default=REPO / "runs" / "lcm-shapes", help="an exported LCM run")
    parser.add_argument("--teacher", type=Path, default=REPO / "assets" / "teachers" / "t2i-shapes")
    parser.add_argument("--seeds", default="0,10,20,30,40",
                        help="comma-separated; batch i of a seed s is drawn with s + i, so keep them apart")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num", type=int, default=1000, help="captions, one image each")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    return parser.parse_args(argv)


def check_seeds(seeds: list[int], config: Any) -> None:
    """Seeds whose batch seeds (the harness's, ``vlkd.eval.sources.batch_seeds``) overlap would share images: a
    SystemExit."""
    from vlkd.eval.sources import batch_seeds

    drawn = [each for seed in seeds for each in batch_seeds(seed, config.num_samples, config.batch_size)]
    if len(set(drawn)) != len(drawn):
        batches = len(drawn) // len(seeds)
        raise SystemExit(f"--seeds {','.join(map(str, seeds))}: each seed draws {batches} batches with seeds s to "
                         f"s + {batches - 1}, so these seeds share images; space them at least {batches} apart")


def measure(pipeline: Any, steps: int, seed: int, guidance_scale: float, prompts: Any, config: Any,
            judge: Any) -> dict:
    """FID and prompt fidelity of ``pipeline`` at ``steps`` for one seed, as the recipe's evaluation measures them."""
    from vlkd.diffusion.evaluate import evaluate_pipeline

    rows, _ = evaluate_pipeline(pipeline, [steps], config, REFERENCE, seed=seed, guidance_scale=guidance_scale,
                                fidelity=prompts, judge=judge, progress=False)
    return {"fid": rows[0]["fd"], "fidelity": rows[0]["fidelity"]}


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation."""
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(rows: list[dict], facts: dict) -> str:
    """The Markdown table: one line per seed, then mean ± standard deviation of every column."""
    lines = [f"# Shapes LCM student against the teacher's DDIM at {facts['steps']} steps, seed by seed", "",
             f"- date: {facts['date']}", f"- command: `{facts['command']}`",
             f"- every figure: {facts['num']:,} images, one per shapes test caption, Inception FID against "
             f"{REFERENCE} (2,000 images), prompt fidelity judged by the shipped shapes CLIP teacher; teacher and "
             "student sampled from the same initial noise for each seed",
             f"- teacher: `{facts['teacher']}`, DDIM (trailing), guidance {facts['teacher_guidance']:g}; student: "
             f"`{facts['student']}`, LCMScheduler, guidance {facts['student_guidance']:g}", "",
             "| seed | teacher FID | student FID | student - teacher | teacher fidelity | student fidelity "
             "| student - teacher |", "|---:|---:|---:|---:|---:|---:|---:|"]
    columns = ("teacher_fid", "student_fid", "fid_gap", "teacher_fidelity", "student_fidelity", "fidelity_gap")
    for row in rows:
        lines.append(f"| {row['seed']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    lines.append("| mean ± sd | " + " | ".join(spread([row[c] for row in rows]) for c in columns) + " |")
    wins = sum(row["fid_gap"] < 0 and row["fidelity_gap"] > 0 for row in rows)
    lines += ["", f"The student is ahead in both FID and fidelity for {wins} of {len(rows)} seeds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from vlkd.bench import script_command
    from vlkd.diffusion.sample import load_pipeline
    from vlkd.eval.fidelity import load_judge, shapes_prompts
    from vlkd.eval.frontier import diffusers_ddim
    from vlkd.files import atomic_file, write_json
    from vlkd.recipes import EvalConfig

    args = parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    config = EvalConfig(num_samples=args.num, features=["inception"], batch_size=args.batch_size)
    check_seeds(seeds, config)
    for name, folder, record in (("--student", args.student, "vlkd.json"), ("--teacher", args.teacher,
                                                                            "metrics.json")):
        if not (folder / record).is_file():
            raise SystemExit(f"{name} {folder}: no {record} there; train and evaluate it first (see this script's "
                             "docstring)")
    student_guidance = json.loads((args.student / "vlkd.json").read_text())["guidance_scale"]
    teacher_guidance = json.loads((args.teacher / "metrics.json").read_text())["guidance"]["chosen"]
    teacher, student = load_pipeline(args.teacher), load_pipeline(args.student)
    teacher.scheduler = diffusers_ddim(teacher)
    for pipeline in (teacher, student):
        pipeline.set_progress_bar_config(disable=True)
    prompts = shapes_prompts(args.num)
    judge = load_judge()  # once, not per seed and model

    rows = []
    for seed in seeds:
        ours = measure(student, args.steps, seed, student_guidance, prompts, config, judge)
        theirs = measure(teacher, args.steps, seed, teacher_guidance, prompts, config, judge)
        rows.append({"seed": seed, "teacher_fid": theirs["fid"], "student_fid": ours["fid"],
                     "fid_gap": ours["fid"] - theirs["fid"], "teacher_fidelity": theirs["fidelity"],
                     "student_fidelity": ours["fidelity"], "fidelity_gap": ours["fidelity"] - theirs["fidelity"]})
        print(f"seed {seed}: teacher {theirs['fid']:.2f} / {theirs['fidelity']:.3f}, "
              f"student {ours['fid']:.2f} / {ours['fidelity']:.3f}", flush=True)

    facts = {"date": datetime.date.today().isoformat(), "steps": args.steps, "num": args.num,
             "command": script_command("bench_lcm_seeds.py", argv),
             "teacher": shown(args.teacher), "student": shown(args.student),
             "teacher_guidance": teacher_guidance, "student_guidance": student_guidance}
    text = report(rows, facts)
    with atomic_file(args.out, "w") as handle:
        handle.write(text)
    write_json(args.out.with_suffix(".json"), {**facts, "rows": rows})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
