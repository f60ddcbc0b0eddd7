"""``imagefolder:PATH`` (class subfolders, or a flat folder) and ``csv:PATH`` (open_clip's image/caption CSV)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import find_classes, make_dataset

from vlkd.data.base import VlkdDataset, check_split
from vlkd.data.images import DEFAULT_IMAGE_SIZE, IMAGE_EXTENSIONS, ImageDecoder, check_image_opens, parse_image_options
from vlkd.errors import DataError

# A file dataset is one split: whichever split is asked for, the data given is it.
FILE_SPLITS = ("train", "test", "all")
CLASS_TASK = "class"


@dataclass(frozen=True)
class ImageRecord:
    """One image file and what it is labelled with."""

    path: Path
    label: int | None = None
    caption: str | None = None


class ImageFileDataset(VlkdDataset):
    """Images read from files listed up front, each with an optional label and caption."""

    def __init__(
        self,
        spec: str,
        split: str,
        records: list[ImageRecord],
        image_size: int,
        channels: int,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(
            spec=spec,
            split=split,
            image_size=image_size,
            channels=channels,
            tasks={CLASS_TASK: class_names} if class_names else {},
            default_task=CLASS_TASK if class_names else None,
        )
        self.records = records
        self.decode = ImageDecoder(image_size, channels)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[self._checked_index(index)]
        sample: dict = {"pixel_values": self.decode(record.path, str(record.path))}
        if record.label is not None:
            sample["label"] = record.label
        if record.caption is not None:
            sample["caption"] = record.caption
        return sample

    def verify(self) -> None:
        """Open every file's header, so a missing or corrupt file fails now rather than mid-training."""
        for record in self.records:
            check_image_opens(record.path)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _existing_folder(spec: str, path_text: str) -> Path:
    root = Path(path_text).expanduser()
    if not path_text:
        raise DataError(f"dataset spec {spec!r} has no path; write imagefolder:PATH")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder (dataset spec {spec!r})")
    return root


def build_imagefolder(
    spec: str,
    path_text: str,
    split: str,
    seed: int | None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    channels: int | str = 3,
) -> ImageFileDataset:
    """Build ``imagefolder:PATH``: one class per subfolder (label = sorted position), or unlabelled if flat."""
    check_split(spec, split, FILE_SPLITS)
    image_size, channel_count = parse_image_options(spec, image_size, channels)
    root = _existing_folder(spec, path_text)
    top_level_images = sorted(path for path in root.iterdir() if _is_image(path))
    class_names, class_to_index = find_classes(str(root)) if any(p.is_dir() for p in root.iterdir()) else ([], {})
    if class_names and top_level_images:
        raise DataError(
            f"image folder {root} has images both at its top level (e.g. {top_level_images[0].name}) and in class "
            "subfolders; put every image in a class subfolder, or use a folder without subfolders"
        )
    if class_names:
        found = make_dataset(str(root), class_to_index, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        records = [ImageRecord(Path(path), label=label) for path, label in found]
    else:
        records = [ImageRecord(path) for path in top_level_images]
    if not records:
        raise DataError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) (dataset spec {spec!r})")
    return ImageFileDataset(spec, split, records, image_size, channel_count, class_names or None)


def build_csv(
    spec: str,
    path_text: str,
    split: str,
    seed: int | None,
    *,
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    csv_separator: str = "\t",
    image_size: int = DEFAULT_IMAGE_SIZE,
    channels: int | str = 3,
) -> ImageFileDataset:
    """Build ``csv:PATH`` in open_clip's format; relative image paths are resolved against the CSV's folder."""
    check_split(spec, split, FILE_SPLITS)
    image_size, channel_count = parse_image_options(spec, image_size, channels)
    csv_path = Path(path_text).expanduser()
    if not csv_path.is_file():
        raise DataError(f"CSV file {csv_path} does not exist (dataset spec {spec!r})")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=csv_separator)
        columns = reader.fieldnames or []
        for key, option in ((csv_img_key, "csv_img_key"), (csv_caption_key, "csv_caption_key")):
            if key not in columns:
                raise DataError(
                    f"CSV file {csv_path} has no column {key!r} (columns: {', '.join(map(repr, columns)) or 'none'}); "
                    f"set {option}, or csv_separator if the columns are not separated by {csv_separator!r}"
                )
        records = []
        for row in reader:
            if not row[csv_img_key] or row[csv_caption_key] is None:
                raise DataError(
                    f"CSV file {csv_path} line {reader.line_num} has no {csv_img_key!r} or {csv_caption_key!r} value"
                )
            records.append(ImageRecord(csv_path.parent / row[csv_img_key], caption=row[csv_caption_key]))
    if not records:
        raise DataError(f"CSV file {csv_path} has a header but no rows (dataset spec {spec!r})")
    return ImageFileDataset(spec, split, records, image_size, channel_count)
