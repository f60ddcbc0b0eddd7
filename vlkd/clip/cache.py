"""Teacher embeddings on disk: computed once per (teacher, data, preprocessing, pool) and read back, so later
epochs never run the teacher (MobileCLIP's "dataset reinforcement", at the scale of one training pool).

Layout: ``<root>/<key>/shard-00000.safetensors ...`` (``image_features`` and ``text_features``, float32,
L2-normalised, rows in pool order, ``SHARD_ROWS`` per shard) and ``meta.json``, written last: a folder without it
is an interrupted fill and is filled again. The key hashes what changes the numbers: the teacher's identity (file
hash or hub name), the dataset spec, split and seed, the teacher's image preprocessing and tokenizer, the caption
treatment and the pool size. For the unlimited shapes train split the pool is its first ``pool_size`` samples
(vlkd.clip.data.CaptionPool), so the same positions are cached whatever the run length.

The fill is its own pass before training (the first "epoch" of a cached run); training reads every teacher output
by ``batch["index"]``. All rows are held in memory: 2 x 4 x D bytes per sample (1 KB at D = 128; 4 KB at D = 512,
so a 3M-caption dataset wants 12 GB: shard and subsample such data before caching it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from vlkd.files import write_json

SHARD_ROWS = 8192
CACHE_VERSION = 1


def cache_key(parts: dict) -> str:
    """A short hash of the JSON of ``parts`` (what the cached numbers depend on)."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class TeacherCache:
    """Teacher outputs for every index of a pool: ``lookup(index)`` -> the dict a teacher forward would return."""

    def __init__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float, folder: Path):
        self.image_features, self.text_features = image_features, text_features
        self.logit_scale, self.folder = logit_scale, folder
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.image_features.shape[0]

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised image and text embeddings and the exponentiated logit scale for pool ``index`` (B,)."""
        device = index.device
        if device not in self._on:  # moved once per device, not per batch
            self._on[device] = (self.image_features.to(device), self.text_features.to(device))
        image, text = self._on[device]
        return {"image_features": image[index], "text_features": text[index],
                "logit_scale": torch.tensor(self.logit_scale, device=device)}

    @classmethod
    def read(cls, folder: Path) -> "TeacherCache | None":
        """The cache in ``folder``, or None when it is absent or incomplete."""
        from safetensors.torch import load_file

        meta_path = Path(folder) / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        shards = [load_file(Path(folder) / name) for name in meta["shards"]]
        image = torch.cat([s["image_features"] for s in shards])
        text = torch.cat([s["text_features"] for s in shards])
        if image.shape[0] != meta["rows"]:
            return None
        return cls(image, text, float(meta["logit_scale"]), Path(folder))


@torch.no_grad()
def fill_cache(folder: Path, teacher: Any, pool: Any, collate: Callable, *, batch_size: int, meta: dict,
               device: str | torch.device = "cpu") -> TeacherCache:
    """Run ``teacher`` once over every sample of ``pool`` in order and write the shards, then ``meta.json``."""
    from safetensors.torch import save

    from vlkd.files import atomic_file

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted fill: start it again
    folder.mkdir(parents=True)
    teacher.to(device).eval()
    text_key = "teacher_text" if getattr(collate, "teacher_tokenizer", None) is not None else "text"
    images, texts, shards, rows, logit_scale = [], [], [], 0, 1.0

    def flush() -> None:
        nonlocal images, texts
        if not images:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {"image_features": torch.cat(images).contiguous(), "text_features": torch.cat(texts).contiguous()}
        with atomic_file(folder / name) as handle:
            handle.write(save(tensors))  # through atomic_file: a shard is never seen half-written
        shards.append(name)
        images, texts = [], []

    loader = DataLoader(pool, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        if not torch.equal(batch["index"], torch.arange(rows, rows + len(batch["index"]))):
            raise RuntimeError("the pool must yield its samples in index order")
        outputs = teacher(batch["pixel_values"].to(device), batch[text_key].to(device))
        images.append(outputs["image_features"].float().cpu())
        texts.append(outputs["text_features"].float().cpu())
        logit_scale = float(outputs["logit_scale"])
        rows += len(batch["index"])
        if sum(len(x) for x in images) >= SHARD_ROWS:
            flush()
    flush()
    write_json(folder / "meta.json", {**meta, "rows": rows, "shards": shards, "logit_scale": logit_scale})
    return TeacherCache.read(folder)


def teacher_cache(root: str | Path, key_parts: dict, teacher: Any, pool: Any, collate: Callable, *,
                  batch_size: int, device: str | torch.device = "cpu") -> TeacherCache:
    """Read the cache for ``key_parts`` under ``root``, computing it first if it is not there."""
    folder = Path(root) / cache_key(key_parts)
    cache = TeacherCache.read(folder)
    if cache is None or len(cache) != len(pool):
        cache = fill_cache(folder, teacher, pool, collate, batch_size=batch_size, meta={"key": key_parts},
                           device=device)
    return cache
