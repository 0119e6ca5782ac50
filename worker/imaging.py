"""Decode uploaded bytes into an upright RGB picture and preprocess it for a model card."""
from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from shared.cards import ModelCard
from shared.errors import DecodeFailed

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclasses.dataclass
class Decoded:
    """An upright RGB image, possibly decoded at reduced scale, and its source format."""

    image: Image.Image
    format: str


def decode(data: bytes, *, min_short_side: int, max_pixels: int) -> Decoded:
    """Decode bytes to an upright RGB image whose shorter side is at least ``min_short_side``.

    Big JPEGs are decoded at reduced scale: ``draft()`` must run before ``load()``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeFailed(f"The image has {width * height} pixels; the limit is {max_pixels}.")
            fmt = image.format
            if fmt == "JPEG":
                scale = min_short_side / min(width, height)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            image = ImageOps.exif_transpose(image)
            return Decoded(to_rgb(image), fmt)
    except DecodeFailed:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as exc:
        raise DecodeFailed(f"The image could not be decoded: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if array.max() > 255 or image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode == "F":
            low, high = float(array.min()), float(array.max())
            array, top = array - low, max(high - low, 1e-6)
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass
class Prepared:
    """The model input for one image and where its crop sits in the upright image."""

    tensor: torch.Tensor  # 3 x S x S, float32, normalised
    crop_box: tuple[float, float, float, float]  # left, top, right, bottom as fractions of the image


def preprocess(image: Image.Image, card: ModelCard) -> Prepared:
    """Resize the shorter side to ``card.resize``, centre-crop ``card.input_size``, normalise.

    Only the region that survives the crop is resampled (``resize(box=...)``), so a 10000x10 strip
    costs the same as a square photo instead of becoming a 256000x256 intermediate.
    """
    width, height = image.size
    side = card.input_size * min(width, height) / card.resize  # the crop, in source pixels
    left, top = (width - side) / 2, (height - side) / 2
    size = (card.input_size, card.input_size)
    crop = image.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)
    array = np.asarray(crop, dtype=np.float32) / 255.0
    array = (array - np.asarray(card.mean, dtype=np.float32)) / np.asarray(card.std, dtype=np.float32)
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
    box = (left / width, top / height, (left + side) / width, (top + side) / height)
    return Prepared(tensor, box)
