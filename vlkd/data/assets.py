"""Where the shipped assets live, and reading their JSON files."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from vlkd.errors import DataError

ASSETS_ENV = "VLKD_ASSETS"


def assets_dir() -> Path:
    """The repository's top-level ``assets/`` folder, or the folder named by ``$VLKD_ASSETS``."""
    override = os.environ.get(ASSETS_ENV)
    if override:
        return Path(override)
    # vlkd/data/assets.py -> the repository root is three levels up.
    return Path(__file__).resolve().parents[2] / "assets"


def load_asset_json(relative_path: str) -> dict[str, Any]:
    """Parse the JSON file at ``assets_dir() / relative_path``."""
    return _load_json(assets_dir() / relative_path)


@cache
def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"asset file {path} is missing; set {ASSETS_ENV} to the folder that holds vlkd's assets"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"asset file {path} cannot be read as JSON ({exc}); restore it from the repository") from None
