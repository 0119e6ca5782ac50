"""Decode uploaded bytes into an upright RGB picture (both tiers: the worker for the model, the web
tier to draw a heatmap over it). Pillow and numpy only, never torch.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

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
