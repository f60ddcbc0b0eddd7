"""Quality against sampling steps: a diffusers pipeline measured under several schedulers and step counts.

What the teacher model cards, ``vlkd eval frontier`` (``run_frontier``) and the demo report print. Measuring goes through
``vlkd.diffusion.evaluate.evaluate_pipeline`` (one sampling run per step count, shared by all feature spaces),
so teacher and student figures come from the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

# DPM-Solver++ (2M) settings tried for a teacher; the best at 4 steps is recorded with it. The keys are
# DPMSolverMultistepScheduler arguments. lambda_min_clipped matters for cosine betas (diffusers' docs), whose
# log-SNR at t = 999 is so low that the first multistep update is numerically unstable; thresholding rescues
# x0 predictions that leave the data range; trailing spacing starts at t = 999 instead of 800 (4 steps).
# Karras sigmas are left out: on cosine betas (sigma_max ~ 2e4) they map several steps to the same timestep
# and diffusers' multistep update then indexes past its sigma table (IndexError at 4 and 8 steps).
DPM_SOLVER_CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "thresholding": {"thresholding": True, "sample_max_value": 1.0},
    "lambda_min_clipped=-5.1": {"lambda_min_clipped": -5.1},
    "trailing": {"timestep_spacing": "trailing"},
    "trailing+thresholding": {"timestep_spacing": "trailing", "thresholding": True, "sample_max_value": 1.0},
    "trailing+lambda_min_clipped=-5.1": {"timestep_spacing": "trailing", "lambda_min_clipped": -5.1},
    "final_sigmas=sigma_min+thresholding": {"final_sigmas_type": "sigma_min", "thresholding": True,
                                            "sample_max_value": 1.0},
}


def ddim_scheduler(config: Any, **overrides: Any) -> Any:
    """Deterministic DDIM (eta = 0) from any DDPM-family config, stepping along its own timestep grid."""
    return _grid_ddim_class().from_config(config, **overrides)


def _grid_ddim_class() -> type:
    """DDIMScheduler whose step goes to the next point of ``self.timesteps``.

    diffusers' DDIMScheduler steps from t to t - T // K, the next grid point only when K divides T. On a trailing
    grid with K = 64 or 256 of T = 1000 (spacing 15.6 or 3.9) each step lands up to a timestep short of where the
    next model call assumes it is, and the error grows with K: the shipped digits teacher measured FID 170 at 256
    steps this way against 8 at 16. Written here because no diffusers scheduler offers DDIM on an arbitrary grid
    through the plain ``step`` that DDPMPipeline / DDIMPipeline call.
    """
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class GridDDIMScheduler(DDIMScheduler):
        def step(self, model_output: Any, timestep: Any, sample: Any, eta: float = 0.0, **kwargs: Any) -> Any:
            if eta:
                raise ValueError("GridDDIMScheduler is deterministic DDIM; eta must be 0")
            later = self.timesteps[self.timesteps < int(timestep)]
            alpha = self.alphas_cumprod[int(timestep)].to(sample.device)
            alpha_next = (self.alphas_cumprod[int(later[0])] if len(later) else self.final_alpha_cumprod
                          ).to(sample.device)
            kind = self.config.prediction_type
            if kind == "epsilon":
                x0 = (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
            elif kind == "sample":
                x0 = model_output
            elif kind == "v_prediction":
                x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
            else:
                raise ValueError(f"prediction_type {kind!r} is not epsilon, sample or v_prediction")
            if self.config.thresholding:
                x0 = self._threshold_sample(x0)
            elif self.config.clip_sample:
                x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
            eps = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
            previous = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps
            if not kwargs.get("return_dict", True):
                return (previous, x0)
            return DDIMSchedulerOutput(prev_sample=previous, pred_original_sample=x0)

    return GridDDIMScheduler


def diffusers_ddim(pipeline: Any) -> Any:
    """diffusers' own DDIMScheduler with trailing spacing for ``pipeline``: the text-to-image teacher's DDIM, as its
    metrics.json rows and its model card's loading code sample it (K = 4 divides T, so it is the grid DDIM there)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")


def dpm_solver_scheduler(config: Any, **overrides: Any) -> Any:
    """DPM-Solver++ (2M) from any DDPM-family config, with ``overrides`` (see ``DPM_SOLVER_CANDIDATES``)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2, **overrides)


def with_scheduler(pipeline: Any, scheduler: Any) -> Any:
    """A pipeline sharing ``pipeline``'s modules but sampling with ``scheduler``."""
    return type(pipeline)(**{**pipeline.components, "scheduler": scheduler})


def measure(pipeline: Any, steps: Sequence[int], config: Any, reference: str, *, model: str, sampler: str,
            seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """``evaluate_pipeline``'s rows (one per step count and feature space) labelled with model and sampler."""
    from vlkd.diffusion.evaluate import evaluate_pipeline

    rows, _ = evaluate_pipeline(pipeline, steps, config, reference, seed=seed, progress=progress)
    return [{**row, "model": model, "sampler": sampler, "seed": seed} for row in rows]


def best_dpm_solver(pipeline: Any, config: Any, reference: str, *, steps: int = 4,
                    candidates: dict[str, dict[str, Any]] = DPM_SOLVER_CANDIDATES) -> tuple[str, dict[str, float]]:
    """Every DPM-Solver++ candidate at ``steps``: the best by the first of ``config.features``, and all scores."""
    scores = {}
    for name, overrides in candidates.items():
        solver = with_scheduler(pipeline, dpm_solver_scheduler(pipeline.scheduler.config, **overrides))
        rows = measure(solver, [steps], config, reference, model="", sampler=name, progress=False)
        scores[name] = rows[0]["fd"]
    return min(scores, key=scores.get), scores


def by_point(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Rows grouped per (model, sampler, steps): the distance per feature space and seconds per image."""
    points: dict[tuple[str, str, int], dict[str, Any]] = {}
    for row in rows:
        point = points.setdefault((row["model"], row["sampler"], row["steps"]),
                                  {"fd": {}, "seconds_per_image": row["seconds_per_image"]})
        point["fd"][row["features"]] = row["fd"]
    return points


def frontier_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: model, sampler, steps (NFE), one column per feature space, seconds per image."""
    points = by_point(rows)
    features = list(dict.fromkeys(f for p in points.values() for f in p["fd"]))
    header = ["model", "sampler", "steps", *("FID" if f == "inception" else f"FD {f}" for f in features), "s/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, sampler, steps), point in points.items():
        cells = [model, sampler, str(steps), *(f"{point['fd'][f]:.2f}" if f in point["fd"] else "-" for f in features),
                 f"{point['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_plot(rows: Sequence[dict[str, Any]], features: str, path: str | Path, title: str = "") -> Path:
    """FD (log scale) against NFE, one line per (model, sampler); written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from vlkd.files import atomic_file

    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["features"] == features:
            curves.setdefault(f"{row['model']} {row['sampler']}".strip(), []).append((row["steps"], row["fd"]))
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("sampling steps (NFE)")
    axes.set_ylabel("FID" if features == "inception" else f"FD ({features})")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return path



def teacher_dpm_solver(teacher_folder: Path) -> tuple[str, dict[str, Any]] | None:
    """The DPM-Solver++ configuration recorded with a shipped teacher (its metrics.json), if any."""
    import json

    path = Path(teacher_folder) / "metrics.json"
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text()).get("dpm_solver")
    return None if not recorded else (recorded["best"], DPM_SOLVER_CANDIDATES.get(recorded["best"], {}))


def student_points(folder: Path, steps: Sequence[int]) -> list[tuple[Path, int]]:
    """(pipeline folder, step count) pairs a distilled student is measured at: a progressive student at each of
    its rounds' step counts (the rounds are kept under ``rounds/``), a consistency student at every requested
    count it can sample (1 to its solver steps)."""
    from vlkd.diffusion.export import read_info

    info = read_info(folder)
    if info.get("method") == "progressive":
        rounds = [folder] + [folder / path for path in info.get("rounds", {}).values()]
        points = [(round_folder, read_info(round_folder)["steps"]) for round_folder in rounds]
        return sorted((p for p in points if p[1] in steps), key=lambda p: p[1])
    limit = info.get("num_solver_steps") or max(steps)
    return [(folder, count) for count in steps if count <= limit]


# Relative. The same samples (seeded per sample) through the same feature network differ only by float summation
# order across thread counts, orders of magnitude below this; a changed teacher or harness moves FIDs far more.
RECHECK_TOLERANCE = 1e-3


def earlier_teacher_rows(path: str | Path, reference: str, config: Any, seed: int, dpm_solver: str,
                         ddim_steps: Sequence[int], dpm_steps: Sequence[int]) -> list[dict[str, Any]]:
    """The teacher's rows of an earlier frontier JSON, or an EvalError unless it was measured against the same
    reference, sample count and seed, with the same DPM-Solver++ configuration, and holds every point needed."""
    import json

    from vlkd.errors import EvalError

    try:
        earlier = json.loads(Path(path).read_text())
        settings = {key: earlier[key] for key in ("reference", "num_samples", "seed", "dpm_solver")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"--teacher-rows {path}: not a frontier JSON written by `vlkd eval frontier --out` "
                        f"({type(exc).__name__}: {exc})") from None
    wanted = {"reference": reference, "num_samples": config.num_samples, "seed": seed, "dpm_solver": dpm_solver}
    differing = [f"{key} {settings[key]!r} (now {wanted[key]!r})" for key in wanted if settings[key] != wanted[key]]
    if differing:
        raise EvalError(f"--teacher-rows {path} was measured with other settings: {', '.join(differing)}; "
                        "measure the teacher again (leave --teacher-rows out)")
    rows = [row for row in earlier["rows"] if row.get("model") == "teacher"]
    needed = [(sampler, count, features) for sampler, counts in (("ddim", ddim_steps),
                                                                  (f"dpm-solver++ ({dpm_solver})", dpm_steps))
              for count in counts for features in config.features]
    have = {point_key(row) for row in rows}
    missing = [point for point in needed if point not in have]
    if missing:
        raise EvalError(f"--teacher-rows {path} lacks teacher point(s) {missing[:3]}; measure the teacher again "
                        "(leave --teacher-rows out)")
    wanted = set(needed)
    return [row for row in rows if point_key(row) in wanted]


def point_key(row: dict[str, Any]) -> tuple[str, int, str]:
    """(sampler, steps, feature space): what identifies one of the teacher's measured figures."""
    return row["sampler"], row["steps"], row["features"]


def recheck(rows: Sequence[dict[str, Any]], measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Earlier and new figures of the re-measured point, or an EvalError if they differ by more than the tolerance:
    the teacher, the harness or the machine no longer gives the earlier numbers."""
    from vlkd.errors import EvalError

    earlier = {point_key(row): row["fd"] for row in rows}
    pairs = {"{}-{} {}".format(*point_key(row)): (earlier[point_key(row)], row["fd"]) for row in measured}
    for point, (before, now) in pairs.items():
        if abs(now - before) > RECHECK_TOLERANCE * max(abs(before), 1e-12):
            raise EvalError(f"the teacher's {point} FD is {now:.4f} now but {before:.4f} in the earlier rows; "
                            "they are not comparable, so measure the teacher again (leave --teacher-rows out)")
    return {point: {"earlier": before, "now": now} for point, (before, now) in pairs.items()}


def run_frontier(teacher: str | Path, students: Sequence[str | Path], steps: Sequence[int], config: Any,
                 reference: str, *, teacher_steps: Sequence[int] = (), dpm_solver: str | None = None,
                 seed: int = 0, teacher_rows: str | Path | None = None
                 ) -> tuple[list[dict[str, Any]], str, dict[str, Any] | None]:
    """Rows for the teacher under DDIM (trailing) and DPM-Solver++ and for each student, all against
    ``reference`` with the same sample count and seed; the name of the DPM-Solver++ configuration used
    (``dpm_solver``, else the one recorded with the teacher, else the best at 4 steps among the candidates); and,
    when the teacher's rows are taken from an earlier frontier JSON (``teacher_rows``), the recheck of its
    fewest-step DDIM point, measured again (None otherwise)."""
    from vlkd.diffusion.sample import load_pipeline

    pipeline = load_pipeline(teacher)
    ddim = with_scheduler(pipeline, ddim_scheduler(pipeline.scheduler.config, timestep_spacing="trailing"))
    ddim_steps = sorted(set(steps) | set(teacher_steps))
    recorded = teacher_dpm_solver(Path(teacher))
    if dpm_solver is None and recorded is None:
        dpm_solver, _ = best_dpm_solver(pipeline, config, reference)
    name = dpm_solver or recorded[0]  # type: ignore[index]
    if teacher_rows is not None:
        rows = earlier_teacher_rows(teacher_rows, reference, config, seed, name, ddim_steps, steps)
        checked = recheck(rows, measure(ddim, ddim_steps[:1], config, reference, model="teacher", sampler="ddim",
                                        seed=seed))
    else:
        checked = None
        rows = measure(ddim, ddim_steps, config, reference, model="teacher", sampler="ddim", seed=seed)
        solver = with_scheduler(pipeline,
                                dpm_solver_scheduler(pipeline.scheduler.config, **DPM_SOLVER_CANDIDATES[name]))
        rows += measure(solver, steps, config, reference, model="teacher", sampler=f"dpm-solver++ ({name})",
                        seed=seed)
    for student in students:
        for folder, count in student_points(Path(student), steps):
            rows += measure(load_pipeline(folder), [count], config, reference, model=Path(student).name,
                            sampler="student", seed=seed)
    return rows, name, checked
