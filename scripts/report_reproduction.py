"""Do the teacher training scripts reproduce the shipped teachers? Retrained figures beside the shipped ones.

    python scripts/train_digits_classifier.py --out /tmp/repro/digits-classifier
    python scripts/train_teacher_clip.py --out /tmp/repro/clip-shapes --run-dir /tmp/repro/clip-run
    python scripts/evaluate_teacher.py clip /tmp/repro/clip-shapes
    python scripts/train_teacher_ddpm.py --out /tmp/repro/ddpm-digits --run-dir /tmp/repro/ddpm-run
    vlkd eval frontier --teacher /tmp/repro/ddpm-digits --steps 4,8 --teacher-steps 16,64 --num 1000 \\
        --reference digits:16@all --dpm-solver final_sigmas=sigma_min+thresholding --out /tmp/repro/ddpm-frontier
    python scripts/report_reproduction.py --classifier /tmp/repro/digits-classifier --clip /tmp/repro/clip-shapes \\
        --ddpm /tmp/repro/ddpm-digits --ddpm-frontier /tmp/repro/ddpm-frontier/frontier.json
        # writes benchmarks/reproduction.md and .json

Every retrained figure is measured by the same code, sample count, seed and reference as the shipped one it sits
beside (the shipped DDPM rows come from the teacher's metrics.json; a row measured differently is refused).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from vlkd.files import atomic_file, write_json
from vlkd.train import describe_clock

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {"classifier": REPO / "assets" / "classifiers" / "digits-classifier",
           "clip": REPO / "assets" / "teachers" / "clip-shapes",
           "ddpm": REPO / "assets" / "teachers" / "ddpm-digits"}
OUTPUT = REPO / "benchmarks" / "reproduction.md"
SAME = ("num_samples", "num_reference", "reference", "seed")  # what makes two FD rows comparable
SAMPLERS = {"ddim": "DDIM", "dpm-solver++": "DPM-Solver++"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _training_line(name: str, folder: Path, retrained: Path) -> str:
    """What a training took, shipped and retrained, as training.json records it."""
    shipped, new = _load(folder / "training.json"), _load(retrained / "training.json")
    return (f"{name}: {describe_clock(shipped, 'training_minutes')} shipped ({shipped['machine']}), "
            f"{describe_clock(new, 'training_minutes')} retrained ({new['machine']})")


def compare_classifier(retrained: Path) -> tuple[list[dict], str]:
    """Test accuracy of the digits classifier (300 held-out digits), and its training time."""
    shipped, new = _load(SHIPPED["classifier"] / "metrics.json"), _load(retrained / "metrics.json")
    rows = [{"model": "digits classifier", "figure": f"test accuracy ({shipped['test_images']} digits)",
             "shipped": shipped["test_accuracy"], "retrained": new["test_accuracy"], "unit": "%"}]
    return rows, (f"digits classifier: {shipped['training_seconds']:.0f} s shipped, "
                  f"{new['training_seconds']:.0f} s retrained")


def compare_clip(retrained: Path) -> tuple[list[dict], str]:
    """Zero-shot top-1 and top-5 of the shapes CLIP teacher on each task, and its training time."""
    shipped, new = _load(SHIPPED["clip"] / "metrics.json"), _load(retrained / "metrics.json")
    rows = [{"model": "shapes CLIP", "figure": f"zero-shot {name} {task}", "shipped": shipped["zero_shot"][task][name],
             "retrained": new["zero_shot"][task][name], "unit": "%"}
            for task in shipped["zero_shot"] for name in ("top1", "top5")]
    return rows, _training_line("clip", SHIPPED["clip"], retrained)


def _fd_key(row: dict) -> tuple:
    # The frontier names a DPM-Solver++ row with its configuration, metrics.json records it once for all rows.
    return row["sampler"].split(" ")[0], row["steps"], row["features"]


def compare_ddpm(retrained: Path, frontier: Path) -> tuple[list[dict], str, dict | None]:
    """Inception FID and digits-classifier FD of the DDPM teacher at every sampler and step count measured both
    times, its training time, and the shipped teacher's own sampling noise."""
    metrics = _load(SHIPPED["ddpm"] / "metrics.json")
    shipped = {_fd_key(row): row for row in metrics["rows"]}
    rows = []
    for row in _load(frontier)["rows"]:
        old = shipped.get(_fd_key(row))
        if row["model"] != "teacher" or old is None:
            continue
        if any(row[key] != old[key] for key in SAME):
            raise SystemExit(f"{frontier}: {_fd_key(row)} was measured with { {k: row[k] for k in SAME} }, the shipped "
                             f"row with { {k: old[k] for k in SAME} }: rerun the frontier with the shipped settings")
        sampler, steps, features = _fd_key(row)
        name = "FID" if features == "inception" else "digits-classifier FD"
        rows.append({"model": "digits DDPM", "figure": f"{name}, {SAMPLERS[sampler]} {steps} step{'s' * (steps > 1)}",
                     "shipped": old["fd"], "retrained": row["fd"], "unit": ""})
    if not rows:
        raise SystemExit(f"{frontier} has no teacher row the shipped metrics.json also has")
    return rows, _training_line("ddpm", SHIPPED["ddpm"], retrained), metrics.get("run_to_run_noise")


def _value(value: float, unit: str) -> str:
    return f"{100 * value:.2f}%" if unit == "%" else f"{value:.2f}"


def _difference(row: dict) -> str:
    delta = row["retrained"] - row["shipped"] + 0.0  # no "-0.00"
    return f"{100 * delta:+.2f} points" if row["unit"] == "%" else f"{delta:+.2f} ({delta / row['shipped']:+.1%})"


def render(rows: list[dict], training: list[str], noise: dict | None) -> str:
    """The markdown report."""
    lines = ["# Retraining the shipped teachers with their scripts' default seed", "",
             "| model | figure | shipped | retrained | difference |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['figure']} | {_value(r['shipped'], r['unit'])} | "
              f"{_value(r['retrained'], r['unit'])} | {_difference(r)} |" for r in rows]
    lines += ["", "Training time:", ""] + [f"- {line}" for line in training]
    if noise:
        lines += ["", f"Sampling noise of the shipped DDPM alone ({noise['what']}): FID {noise['inception']:.2f}, "
                      f"digits-classifier FD {noise['digits-classifier']:.2f}."]
    lines += ["", f"Written by `python scripts/report_reproduction.py`, {datetime.date.today().isoformat()}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path, help="a retrained digits classifier folder")
    parser.add_argument("--clip", type=Path, help="a retrained CLIP teacher folder, measured by evaluate_teacher.py")
    parser.add_argument("--ddpm", type=Path, help="a retrained DDPM teacher folder (its training.json)")
    parser.add_argument("--ddpm-frontier", type=Path, help="that teacher's frontier.json, measured as above")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    if bool(args.ddpm) != bool(args.ddpm_frontier):
        raise SystemExit("--ddpm and --ddpm-frontier go together: the retrained folder and its frontier.json")
    rows, training, noise = [], [], None
    for compare, given in ((compare_classifier, args.classifier), (compare_clip, args.clip)):
        if given:
            more, line = compare(given)
            rows, training = rows + more, training + [line]
    if args.ddpm:
        more, line, noise = compare_ddpm(args.ddpm, args.ddpm_frontier)
        rows, training = rows + more, training + [line]
    if not rows:
        raise SystemExit("nothing to compare: pass --classifier, --clip and/or --ddpm")
    text = render(rows, training, noise)
    with atomic_file(args.out, "w") as handle:
        handle.write(text)
    write_json(args.out.with_suffix(".json"), {"rows": rows, "training": training, "sampling_noise": noise})
    print(text)


if __name__ == "__main__":
    main()
