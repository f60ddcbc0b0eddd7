"""The run folder beside an output, ``<out>.run/``: where a distillation keeps its checkpoints until it is done.

It records the recipe that started it, so ``--resume`` continues only the same run; it exists only while the
output does not, and the pipelines remove it once the output folder is renamed into place. On several processes
only the main one creates or clears it; the others wait.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from vlkd.distributed import is_main_process, wait_for_everyone
from vlkd.errors import CheckpointError
from vlkd.files import write_json
from vlkd.recipes import Recipe, recipe_to_dict

# Train keys that change how a run is watched, not what it trains: they may differ when resuming.
_OPERATIONAL_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "attention")


def recipe_identity(recipe: Recipe) -> dict[str, Any]:
    """What must not change between a run and its resumption (as plain JSON data)."""
    data = recipe_to_dict(recipe)
    identity = {k: data[k] for k in ("pipeline", "teacher", "data", "method", "student", "train")}
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in _OPERATIONAL_KEYS}
    return json.loads(json.dumps(identity, default=str))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} then, {new!r} now)"]


def open_run_folder(out: str | Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> Path:
    """Start ``<out>.run/``, or reopen it with ``resume`` after checking that it ran the same recipe."""
    out = Path(out)
    path = out.with_name(out.name + ".run")
    recorded = path / "recipe.json"
    identity = recipe_identity(recipe)
    if resume:
        if not recorded.is_file():
            raise CheckpointError(f"--resume: {path} holds no earlier run of this recipe; run without --resume")
        changed = _differences(json.loads(recorded.read_text()), identity)
        if changed:
            raise CheckpointError(f"--resume: the recipe differs from the run in {path} at {changed[0]}; "
                                  "resume with the same recipe, or pass --overwrite without --resume")
    elif path.exists() and not overwrite:
        raise CheckpointError(f"{path} holds an unfinished run; pass --resume to continue it or --overwrite "
                              "to start over")
    wait_for_everyone()  # every process has checked the folder as it was before the main one changes it
    if is_main_process():
        if not resume and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        if not recorded.is_file():
            write_json(recorded, identity)
    wait_for_everyone()
    return path
