"""Decode uploaded bytes into an upright RGB picture (both tiers: the worker for the model, the web
tier to draw a heatmap over it). Pillow and numpy only, never torch.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
from PIL import Image

from shared.errors import DecodeFailed

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# A big picture is box-reduced right after decoding to no less than this many times the shorter side
# the model asks for: the resize in preprocessing reduces by the same gap first, so what the model
# sees barely changes, while every later copy (orientation, mode conversion) is of a small picture.
REDUCING_GAP = 3
BAND_PIXELS = 1 << 20  # pixels of a big picture converted at once while it is reduced
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}  # as ImageOps.exif_transpose


@dataclasses.dataclass
class Decoded:
    """An upright RGB image, possibly decoded at reduced scale, and its source format."""

    image: Image.Image
    format: str


def decode(data: bytes, *, min_short_side: int, max_pixels: int) -> Decoded:
    """Decode bytes to an upright RGB image whose shorter side is at least ``min_short_side``.

    Big JPEGs are decoded at reduced scale: ``draft()`` must run before ``load()``. Other big
    pictures are decoded whole and reduced at once (``reduce()``), so the full-size picture is the
    only full-size copy ever made, and it is dropped before orientation and mode conversion.
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
            orientation = image.getexif().get(_ORIENTATION, 1)
            image = _reduced(image, min_short_side)
            if orientation in _TRANSPOSE:
                image = image.transpose(_TRANSPOSE[orientation])
            return Decoded(to_rgb(image), fmt)
    except DecodeFailed:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as exc:
        raise DecodeFailed(f"The image could not be decoded: {exc}") from exc


def header_pixels(data: bytes) -> int:
    """The pixel count an upload's header announces (0 when there is no readable header)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS).size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        return 0
    return width * height


def _reduced(image: Image.Image, min_short_side: int) -> Image.Image:
    """Box-reduce a big decoded picture by a whole factor, keeping its shorter side at least
    REDUCING_GAP x ``min_short_side``; a small one, or a mode reduce() does not take, as it is.

    A band of rows at a time: reducing converts what it reduces (palette to colours, 16-bit to
    32-bit, RGBA to premultiplied), and a band's copy is small where the whole picture's is not.
    """
    factor = min(image.size) // (REDUCING_GAP * min_short_side)
    if factor < 2 or image.mode == "1":
        return image  # reduce() refuses "1"; to_rgb converts it
    working = {"P": "RGBA" if "transparency" in image.info else "RGB", "I;16": "I", "I;16B": "I", "I;16L": "I",
               "I;16N": "I"}.get(image.mode, image.mode)  # palette indices cannot be averaged: colours can
    width, height = image.size
    step = factor * max(1, BAND_PIXELS // (factor * width))
    reduced = Image.new(working, (-(-width // factor), -(-height // factor)))
    for top in range(0, height, step):
        band = image.crop((0, top, width, min(height, top + step)))
        reduced.paste(band.convert(working).reduce(factor), (0, top // factor))
    return reduced.convert(image.mode) if image.mode.startswith("I;16") else reduced  # to_rgb knows 16-bit


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        array = np.array(image, dtype=np.float32)  # one float copy, scaled in place: 4 bytes a pixel
        top = 65535.0 if array.max() > 255 or image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode == "F":
            low, high = float(array.min()), float(array.max())
            array -= low
            top = max(high - low, 1e-6)
        array *= 255.0 / top
        image = Image.fromarray(np.clip(array, 0, 255, out=array).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
