"""``hf:PATH``: a Hugging Face ``datasets`` dataset written with ``save_to_disk`` (a Dataset or a DatasetDict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlkd.data.base import VlkdDataset, check_split
from vlkd.data.folders import CLASS_TASK, FILE_SPLITS
from vlkd.data.images import DEFAULT_IMAGE_SIZE, ImageDecoder, parse_image_options
from vlkd.errors import DataError


def _load_from_disk(spec: str, root: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset spec {spec!r} needs the 'datasets' package; pip install datasets") from None
    if not root.exists():
        raise DataError(f"Hugging Face dataset folder {root} does not exist (dataset spec {spec!r})")
    try:
        return datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{root} is not a dataset written by save_to_disk ({reason}) (dataset spec {spec!r})") from None


def _select_split(spec: str, root: Path, loaded: Any, split: str) -> Any:
    """A DatasetDict's named split ('all' joins them); a plain Dataset is every split."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split == "all":
        return datasets.concatenate_datasets([loaded[name] for name in loaded])
    if split not in loaded:
        raise DataError(f"Hugging Face dataset {root} has no split {split!r}; its splits are: {', '.join(loaded)}")
    return loaded[split]


def _class_names(table: Any, label_key: str) -> list[str]:
    """ClassLabel names when the column has them, else the label integers as text."""
    feature = table.features[label_key]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    return [str(label) for label in range(max(table[label_key], default=-1) + 1)]


class HuggingFaceDataset(VlkdDataset):
    """Rows of a ``datasets.Dataset``: an image column, and optional caption and label columns."""

    def __init__(
        self,
        spec: str,
        split: str,
        table: Any,
        image_size: int,
        channels: int,
        image_key: str,
        caption_key: str | None,
        label_key: str | None,
        where: str,
    ) -> None:
        class_names = _class_names(table, label_key) if label_key else None
        super().__init__(
            spec=spec,
            split=split,
            image_size=image_size,
            channels=channels,
            tasks={CLASS_TASK: class_names} if class_names else {},
            default_task=CLASS_TASK if class_names else None,
        )
        self.table = table
        self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
        self.where = where
        self.decode = ImageDecoder(image_size, channels)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        index = self._checked_index(index)
        row = self.table[index]
        image = row[self.image_key]
        where = f"{self.where} row {index}"
        # An Image feature decodes to PIL; an undecoded one is {"bytes", "path"}; a string column holds paths.
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if image is None:
            raise DataError(f"{where} has no image in column {self.image_key!r}")
        sample: dict = {"pixel_values": self.decode(image, where)}
        if self.caption_key:
            sample["caption"] = str(row[self.caption_key])
        if self.label_key:
            sample["label"] = int(row[self.label_key])
        return sample


def build_hf(
    spec: str,
    path_text: str,
    split: str,
    seed: int | None,
    *,
    image_key: str = "image",
    caption_key: str | None = None,
    label_key: str | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    channels: int | str = 3,
) -> HuggingFaceDataset:
    """Build ``hf:PATH``; caption and label columns default to ``text`` and ``label`` when present."""
    check_split(spec, split, FILE_SPLITS)
    image_size, channel_count = parse_image_options(spec, image_size, channels)
    root = Path(path_text).expanduser()
    table = _select_split(spec, root, _load_from_disk(spec, root), split)
    if len(table) == 0:
        raise DataError(f"Hugging Face dataset {root} has no rows in split {split!r} (dataset spec {spec!r})")
    columns = list(table.column_names)

    def column(key: str | None, option: str, default: str | None) -> str | None:
        # A column asked for by name must exist; a default one is used only when the data has it.
        if key is None:
            return default if default in columns else None
        if key not in columns:
            raise DataError(
                f"Hugging Face dataset {root} has no column {key!r} (columns: {', '.join(columns)}); set {option}"
            )
        return key

    image_column = column(image_key, "image_key", None)
    return HuggingFaceDataset(
        spec,
        split,
        table,
        image_size,
        channel_count,
        image_column,
        column(caption_key, "caption_key", "text"),
        column(label_key, "label_key", "label"),
        str(root),
    )
