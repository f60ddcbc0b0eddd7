"""The ``vlkd`` command. Thin: parse arguments, load the recipe, call the library.

A ``VlkdError`` becomes one line on stderr and exit code 2; ``--debug`` or ``VLKD_DEBUG=1`` shows its
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from vlkd.errors import VlkdError

# Subcommands whose arguments live next to the code they call: "module:function(subparsers)".
_EXTERNAL_COMMANDS = {
    "eval": "vlkd.eval.commands:add_eval_commands",
}


def _cmd_distill(args: argparse.Namespace) -> int:
    from vlkd.distributed import check_launch
    from vlkd.recipes import get_pipeline, load_recipe

    check_launch()
    recipe = load_recipe(args.recipe, args.set or [])
    out = Path(args.out or recipe.out or f"runs/{Path(args.recipe).stem}")
    spec = get_pipeline(recipe.pipeline, f"recipe {args.recipe}")
    folder = spec.run(recipe, out, resume=args.resume, overwrite=args.overwrite)
    from vlkd.distributed import is_main_process

    if is_main_process():
        print(f"wrote {folder}")
    return 0


def _not_yet(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise VlkdError(f"`vlkd {name}` is not available in this version of vlkd yet")

    return run


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """Import the implementation only when the subcommand runs, so `vlkd --help` stays fast."""

    def run(args: argparse.Namespace) -> int:
        module_name, function = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("vlkd"):
                return _not_yet(args.command)(args)
            raise
        return getattr(module, function)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vlkd`` command."""
    parser = argparse.ArgumentParser(
        prog="vlkd",
        description="Distil diffusion teachers into few-step samplers and CLIP teachers into small encoders.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of vlkd errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="distil the shipped teachers end to end and write a report")
    demo.add_argument("--out", default="vlkd-demo", help="report folder (default: vlkd-demo)")
    demo.add_argument("--quick", action="store_true", help="a run of about 3 minutes instead of 15")
    demo.add_argument("--inception", action="store_true", help="Inception FID instead of the digits classifier")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    demo.set_defaults(func=_lazy("vlkd.demo:run_demo"))

    distill = sub.add_parser("distill", help="run a distillation recipe (pipelines/*.yaml)")
    distill.add_argument("recipe", help="path of a recipe YAML file")
    distill.add_argument("--out", help="output folder (default: the recipe's `out`)")
    distill.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. train.steps=100"
    )
    distill.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    distill.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    distill.set_defaults(func=_cmd_distill)

    sample = sub.add_parser("sample", help="sample an exported diffusion student into a PNG grid")
    sample.add_argument("folder", help="an exported diffusers pipeline folder")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the student's)")
    sample.add_argument("--num", type=int, default=16, help="number of images")
    sample.add_argument("--prompt", action="append", help="prompt(s) for text-to-image students")
    sample.add_argument("--guidance-scale", type=float, help="guidance scale for text-to-image students")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="samples.png", help="PNG grid to write")
    sample.set_defaults(func=_lazy("vlkd.diffusion.sample:run_sample_command"))

    evaluate = sub.add_parser("eval", help="measure FID, KID, zero-shot accuracy and NFE frontiers")
    evaluate_sub = evaluate.add_subparsers(dest="eval_command", metavar="METRIC", required=True)
    module_name, function = _EXTERNAL_COMMANDS["eval"].split(":")
    try:
        getattr(importlib.import_module(module_name), function)(evaluate_sub)
    except ModuleNotFoundError as exc:
        if not (exc.name and exc.name.startswith("vlkd")):
            raise

    export = sub.add_parser("export", help="re-export a trained student (e.g. as a transformers CLIPModel)")
    export.add_argument("run", help="a run or output folder")
    export.add_argument("--format", choices=["diffusers", "open_clip", "transformers"], help="target format")
    export.add_argument("--out", help="folder to write")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=_lazy("vlkd.export_command:run_export_command"))

    bench = sub.add_parser("bench", help="run the benchmark scripts and write benchmarks/*.md")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true",
                       help="smaller sizes, for a smoke run (written to runs/bench-quick/ unless --out)")
    bench.add_argument("--out", metavar="DIR", help="write the tables here instead of benchmarks/")
    bench.set_defaults(func=_lazy("vlkd.bench:run_bench_command"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vlkd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("VLKD_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except VlkdError as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"vlkd: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
