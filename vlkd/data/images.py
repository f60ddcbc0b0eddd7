"""Decoding image files into ``pixel_values``: shorter side resized, centre-cropped, scaled to [-1, 1]."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from vlkd.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_IMAGE_SIZE = 32
# PIL raises all of these for corrupt, truncated or hostile files, depending on the format's decoder.
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_PIL_MODES = {1: "L", 3: "RGB"}
_CHANNEL_NAMES = {1: 1, 3: 3, "L": 1, "RGB": 3}


def image_error(where: str, exc: BaseException) -> DataError:
    """A one-line DataError naming the image that failed and why."""
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return DataError(f"cannot read image {where}: {reason}; replace or remove that file")


def parse_image_options(spec: str, image_size: int, channels: int | str) -> tuple[int, int]:
    """Validate the ``image_size`` and ``channels`` options of a file dataset."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 1 <= image_size <= 4096:
        raise DataError(f"bad image_size={image_size!r} for dataset {spec!r}; use an integer from 1 to 4096")
    if channels not in _CHANNEL_NAMES:
        raise DataError(f"bad channels={channels!r} for dataset {spec!r}; use 3 (or 'RGB') or 1 (or 'L')")
    return image_size, _CHANNEL_NAMES[channels]


def check_image_opens(path: Path) -> None:
    """Read the header of an image file (cheap: no pixel decoding), raising DataError if it is not an image."""
    try:
        Image.open(path).close()
    except IMAGE_DECODE_ERRORS as exc:
        raise image_error(str(path), exc) from None


class ImageDecoder:
    """Turns an image file, encoded bytes, or a PIL image into a (C, S, S) float32 tensor in [-1, 1]."""

    def __init__(self, image_size: int, channels: int) -> None:
        self.mode = _PIL_MODES[channels]
        # Bicubic with antialiasing on the PIL image, as open_clip's preprocessing does.
        self.transform = transforms.Compose(
            [
                transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(image_size),
                transforms.PILToTensor(),
            ]
        )

    def __call__(self, source: Path | str | bytes | Image.Image, where: str) -> torch.Tensor:
        """Decode ``source``; ``where`` names it in the error if it cannot be read."""
        try:
            if isinstance(source, Image.Image):
                image = source.convert(self.mode)
            else:
                with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                    image = opened.convert(self.mode)
        except IMAGE_DECODE_ERRORS as exc:
            raise image_error(where, exc) from None
        return self.transform(image).float().div_(127.5).sub_(1.0)
