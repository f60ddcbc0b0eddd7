"""Frozen-model outputs on disk, one row per sample of a training pool: computed once, read back on later epochs.

What the CLIP pipeline caches (teacher image and text embeddings) and the latent consistency pipelines cache
(VAE posteriors and text-encoder states) both fit this: a function of a batch that returns named per-sample
tensors. Layout: ``<root>/<key>/shard-00000.safetensors ...`` (every named tensor, rows in pool order, about
``SHARD_ROWS`` per shard) and ``meta.json``, written last: a folder without it is an interrupted fill and is filled
again. The key hashes what changes the numbers (the caller names it: model identity, data, preprocessing, pool).
Rows are held in memory after reading.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from vlkd.files import atomic_file, write_json

SHARD_ROWS = 8192
CACHE_VERSION = 2  # 2: named rows and constants (vlkd.cache), was CLIP-only

# A batch -> (per-sample tensors, (B, ...) each; constants that are the same for every sample, e.g. a logit scale).
ComputeRows = Callable[[dict], tuple[dict[str, torch.Tensor], dict[str, float]]]


def cache_key(parts: dict) -> str:
    """A short hash of the JSON of ``parts`` (what the cached numbers depend on)."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class PoolCache:
    """Named rows for every index of a pool: ``lookup(index)`` -> each tensor's rows at ``index``, on its device."""

    def __init__(self, rows: dict[str, torch.Tensor], constants: dict[str, float], folder: Path):
        self.rows, self.constants, self.folder = rows, constants, folder
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0]

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at pool ``index`` (B,) of every cached tensor."""
        device = index.device
        if device not in self._on:  # moved once per device, not per batch
            self._on[device] = {name: value.to(device) for name, value in self.rows.items()}
        return {name: value[index] for name, value in self._on[device].items()}

    @classmethod
    def read(cls, folder: str | Path) -> "PoolCache | None":
        """The cache in ``folder``, or None when it is absent or incomplete."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        shards = [load_file(folder / name) for name in meta["shards"]]
        if not shards:
            return None
        rows = {name: torch.cat([shard[name] for shard in shards]) for name in shards[0]}
        if any(value.shape[0] != meta["rows"] for value in rows.values()):
            return None
        return cls(rows, meta.get("constants", {}), folder)


@torch.no_grad()
def fill_pool_cache(folder: str | Path, compute: ComputeRows, pool: Any, collate: Callable, *, batch_size: int,
                    meta: dict) -> PoolCache:
    """Run ``compute`` once over every sample of ``pool`` in order and write the shards, then ``meta.json``."""
    from safetensors.torch import save

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted fill: start it again
    folder.mkdir(parents=True)
    pending: dict[str, list[torch.Tensor]] = {}
    shards: list[str] = []
    rows, constants = 0, {}

    def flush() -> None:
        if not pending:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {key: torch.cat(values).contiguous() for key, values in pending.items()}
        with atomic_file(folder / name) as handle:
            handle.write(save(tensors))  # through atomic_file: a shard is never seen half-written
        shards.append(name)
        pending.clear()

    for batch in DataLoader(pool, batch_size=batch_size, shuffle=False, collate_fn=collate):
        count = len(batch["index"])
        if not torch.equal(torch.as_tensor(batch["index"]), torch.arange(rows, rows + count)):
            raise RuntimeError("the pool must yield its samples in index order")
        outputs, constants = compute(batch)
        for key, value in outputs.items():
            pending.setdefault(key, []).append(value.detach().cpu())
        rows += count
        if sum(len(x) for x in next(iter(pending.values()))) >= SHARD_ROWS:
            flush()
    flush()
    write_json(folder / "meta.json", {**meta, "rows": rows, "shards": shards, "constants": constants})
    return PoolCache.read(folder)


def pool_cache(root: str | Path, key_parts: dict, compute: ComputeRows, pool: Any, collate: Callable, *,
               batch_size: int) -> PoolCache:
    """Read the cache for ``key_parts`` under ``root``, computing it first if it is not there."""
    folder = Path(root) / cache_key(key_parts)
    cache = PoolCache.read(folder)
    if cache is None or len(cache) != len(pool):
        cache = fill_pool_cache(folder, compute, pool, collate, batch_size=batch_size, meta={"key": key_parts})
    return cache
