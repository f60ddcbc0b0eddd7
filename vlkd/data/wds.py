"""``wds:PATTERN``: webdataset tar shards (``data/{000..009}.tar``), indexed once so any sample can be read directly.

The stdlib ``tarfile`` scan records where each member's bytes lie; reading a sample is then one seek and one
read, which gives a map-style dataset with a length (the ``webdataset`` package only streams).
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from vlkd.data.base import VlkdDataset, check_split
from vlkd.data.folders import CLASS_TASK, FILE_SPLITS
from vlkd.data.images import DEFAULT_IMAGE_SIZE, ImageDecoder, parse_image_options
from vlkd.errors import DataError

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's grouping rule: the key is the member's path up to the first dot of its file name.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass(frozen=True)
class MemberSpan:
    """Where one tar member's bytes lie in its shard."""

    offset: int
    size: int


@dataclass(frozen=True)
class ShardSample:
    """One sample: its shard, key, image bytes' location, and caption/label when the shard has them."""

    shard: Path
    key: str
    image: MemberSpan
    caption: str | None
    label: int | None


def expand_shard_pattern(spec: str, pattern: str) -> list[Path]:
    """Expand bash-style braces (``{000..009}``, ``{a,b}``) into shard paths."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise DataError(f"dataset spec {spec!r} needs the 'braceexpand' package; pip install braceexpand") from None
    if not pattern:
        raise DataError(f"dataset spec {spec!r} has no shard pattern; write wds:PATH/{{000..009}}.tar")
    return [Path(path).expanduser() for path in braceexpand(pattern)]


def _read_span(shard: Path, span: MemberSpan) -> bytes:
    with shard.open("rb") as handle:
        handle.seek(span.offset)
        return handle.read(span.size)


def _scan_shard(shard: Path) -> list[ShardSample]:
    """Group a shard's members by key, in order, reading the small text and class entries now."""
    if not shard.is_file():
        raise DataError(f"tar shard {shard} does not exist")
    groups: dict[str, dict[str, MemberSpan]] = {}
    try:
        # "r:" refuses compressed archives, whose members cannot be read by offset.
        with tarfile.open(shard, "r:") as archive:
            for member in archive:
                match = _KEY_AND_EXTENSION.match(member.name)
                if member.isfile() and match:
                    key, extension = match.groups()
                    groups.setdefault(key, {})[extension.lower()] = MemberSpan(member.offset_data, member.size)
    except tarfile.TarError as exc:
        raise DataError(f"cannot read tar shard {shard} ({exc}); vlkd reads uncompressed .tar shards") from None
    samples = []
    for key, members in groups.items():
        image = next((members[ext] for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            raise DataError(
                f"tar shard {shard} sample {key!r} has no image ({', '.join(WDS_IMAGE_EXTENSIONS)}); "
                f"it has {sorted(members)}"
            )
        caption = _read_span(shard, members["txt"]).decode("utf-8").strip() if "txt" in members else None
        label = None
        if "cls" in members:
            text = _read_span(shard, members["cls"]).decode("utf-8").strip()
            if not text.isdigit():
                raise DataError(
                    f"tar shard {shard} sample {key!r} has class {text!r}; a .cls entry must be a non-negative integer"
                )
            label = int(text)
        samples.append(ShardSample(shard, key, image, caption, label))
    return samples


def _all_or_none(samples: list[ShardSample], field: str, entry: str) -> bool:
    """Whether every sample has ``field``; a mix is an error, since batches must share keys."""
    missing = next((s for s in samples if getattr(s, field) is None), None)
    if missing is None:
        return True
    if any(getattr(s, field) is not None for s in samples):
        raise DataError(f"tar shard {missing.shard} sample {missing.key!r} has no .{entry} entry but other samples do")
    return False


class WebDatasetShards(VlkdDataset):
    """Samples of scanned tar shards, read by offset."""

    def __init__(
        self,
        spec: str,
        split: str,
        samples: list[ShardSample],
        image_size: int,
        channels: int,
        class_names: list[str] | None,
    ) -> None:
        super().__init__(
            spec=spec,
            split=split,
            image_size=image_size,
            channels=channels,
            tasks={CLASS_TASK: class_names} if class_names else {},
            default_task=CLASS_TASK if class_names else None,
        )
        self.samples = samples
        self.decode = ImageDecoder(image_size, channels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[self._checked_index(index)]
        item: dict = {
            "pixel_values": self.decode(_read_span(sample.shard, sample.image), f"{sample.shard}:{sample.key}")
        }
        if sample.label is not None:
            item["label"] = sample.label
        if sample.caption is not None:
            item["caption"] = sample.caption
        return item


def build_wds(
    spec: str,
    pattern: str,
    split: str,
    seed: int | None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    channels: int | str = 3,
) -> WebDatasetShards:
    """Build ``wds:PATTERN`` by scanning every shard once; labels come from ``.cls``, captions from ``.txt``."""
    check_split(spec, split, FILE_SPLITS)
    image_size, channel_count = parse_image_options(spec, image_size, channels)
    shards = expand_shard_pattern(spec, pattern)
    samples = [sample for shard in shards for sample in _scan_shard(shard)]
    if not samples:
        raise DataError(f"tar shards {pattern} hold no samples (dataset spec {spec!r})")
    _all_or_none(samples, "caption", "txt")
    has_labels = _all_or_none(samples, "label", "cls")
    class_names = [str(i) for i in range(max(s.label for s in samples) + 1)] if has_labels else None
    return WebDatasetShards(spec, split, samples, image_size, channel_count, class_names)
