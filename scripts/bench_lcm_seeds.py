"""Seed-to-seed spread of the shapes LCM student against the teacher's DDIM at the same step count.

    vlkd distill pipelines/lcm-shapes.yaml
    python scripts/bench_lcm_seeds.py      # writes benchmarks/lcm-shapes-seeds.md and benchmarks/lcm-shapes-seeds.json
    python scripts/bench_lcm_seeds.py --split validation --student-guidance 2,2.5,3 --out guidance.md

Issue 7 compares the 4-step student with the teacher's 4-step DDIM on one evaluation (seed 0). Here both are
sampled by the same function (``vlkd.diffusion.evaluate.evaluate_pipeline``, the one the recipe's evaluation runs),
from the same initial noise for each seed, on 1,000 shapes test captions, one image each: Inception FID against the
2,000 test images and prompt fidelity judged by the shapes CLIP teacher. The table gives each seed's figures, the
paired student-minus-teacher differences, and their means and standard deviations, so that a gap between the two
can be told from sampling noise. The teacher samples with diffusers' DDIMScheduler, trailing spacing, at the
guidance scale its metrics.json chose; the student with its own LCMScheduler at the scale its vlkd.json records, or
at each of ``--student-guidance``.

``--split validation`` measures on captions and images drawn from a shapes train stream neither teacher nor student
saw (``vlkd.eval.fidelity.shapes_validation``), shaped like the test split: that is where a student's sampling
guidance is chosen, so that the test captions only measure the choice.
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
    parser.add_argument("--student-guidance", default=None,
                        help="comma-separated guidance scales to sample the student at (default: its vlkd.json's)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="test: the shapes test captions and images; validation: a held-out train stream")
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


def measure(pipeline: Any, steps: int, seed: int, guidance_scale: float, prompts: Any, reference: Any, config: Any,
            judge: Any) -> dict:
    """FID and prompt fidelity of ``pipeline`` at ``steps`` for one seed, as the recipe's evaluation measures them."""
    from vlkd.diffusion.evaluate import evaluate_pipeline

    rows, _ = evaluate_pipeline(pipeline, [steps], config, reference, seed=seed, guidance_scale=guidance_scale,
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
    """The Markdown table: one line per seed and student guidance scale, then, for each scale, mean ± standard
    deviation of every column and the seeds on which the student is ahead in both."""
    where = "test caption" if facts["split"] == "test" else "validation caption"
    lines = [f"# Shapes LCM student against the teacher's DDIM at {facts['steps']} steps, seed by seed", "",
             f"- date: {facts['date']}", f"- command: `{facts['command']}`",
             f"- every figure: {facts['num']:,} images, one per shapes {where}, Inception FID against "
             f"{facts['reference']}, prompt fidelity judged by the shipped shapes CLIP teacher; teacher "
             "and student sampled from the same initial noise for each seed",
             f"- teacher: `{facts['teacher']}`, DDIM (trailing), guidance {facts['teacher_guidance']:g}; student: "
             f"`{facts['student']}`, LCMScheduler, guidance "
             + ", ".join(f"{w:g}" for w in facts["student_guidance"]), "",
             "| seed | student guidance | teacher FID | student FID | student - teacher | teacher fidelity "
             "| student fidelity | student - teacher |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    columns = ("teacher_fid", "student_fid", "fid_gap", "teacher_fidelity", "student_fidelity", "fidelity_gap")
    scales = facts["student_guidance"]
    for row in sorted(rows, key=lambda row: (scales.index(row["student_guidance"]), row["seed"])):
        lines.append(f"| {row['seed']} | {row['student_guidance']:g} | "
                     + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    summary = []
    for w in scales:
        group = [row for row in rows if row["student_guidance"] == w]
        lines.append(f"| mean ± sd | {w:g} | " + " | ".join(spread([row[c] for row in group]) for c in columns)
                     + " |")
        wins = sum(row["fid_gap"] < 0 and row["fidelity_gap"] > 0 for row in group)
        summary.append(f"At guidance {w:g} the student is ahead in both FID and fidelity for {wins} of "
                       f"{len(group)} seeds.")
    return "\n".join(lines + [""] + summary) + "\n"


def main(argv: list[str] | None = None) -> int:
    from vlkd.bench import script_command
    from vlkd.diffusion.sample import load_pipeline
    from vlkd.eval.fidelity import VALIDATION_STREAM, load_judge, shapes_prompts, shapes_validation
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
    student_guidance = ([float(w) for w in args.student_guidance.split(",")] if args.student_guidance else
                        [json.loads((args.student / "vlkd.json").read_text())["guidance_scale"]])
    teacher_guidance = json.loads((args.teacher / "metrics.json").read_text())["guidance"]["chosen"]
    teacher, student = load_pipeline(args.teacher), load_pipeline(args.student)
    teacher.scheduler = diffusers_ddim(teacher)
    for pipeline in (teacher, student):
        pipeline.set_progress_bar_config(disable=True)
    # Either reference's statistics are computed once, then read from vlkd's cache by every measurement.
    if args.split == "test":
        prompts, reference = shapes_prompts(args.num), REFERENCE
        described = f"{REFERENCE} (2,000 images)"
    else:
        prompts, reference = shapes_validation(args.num)
        described = (f"{reference.count():,} images of shapes train stream {VALIDATION_STREAM} "
                     "(vlkd.eval.fidelity.shapes_validation)")
    judge = load_judge()  # once, not per seed and model

    rows = []
    for seed in seeds:
        theirs = None
        for w in student_guidance:
            ours = measure(student, args.steps, seed, w, prompts, reference, config, judge)
            theirs = theirs or measure(teacher, args.steps, seed, teacher_guidance, prompts, reference, config, judge)
            rows.append({"seed": seed, "student_guidance": w, "teacher_fid": theirs["fid"], "student_fid": ours["fid"],
                         "fid_gap": ours["fid"] - theirs["fid"], "teacher_fidelity": theirs["fidelity"],
                         "student_fidelity": ours["fidelity"], "fidelity_gap": ours["fidelity"] - theirs["fidelity"]})
            print(f"seed {seed}: teacher {theirs['fid']:.2f} / {theirs['fidelity']:.3f}, student at guidance {w:g} "
                  f"{ours['fid']:.2f} / {ours['fidelity']:.3f}", flush=True)

    facts = {"date": datetime.date.today().isoformat(), "steps": args.steps, "num": args.num, "split": args.split,
             "reference": described,
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
