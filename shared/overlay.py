"""Render a GradCAM map as a colour heatmap blended over the upright image, as PNG.

Rendering is off the inference path: the worker stores the map (a few hundred bytes) and keeps a
small picture to draw it on; ``gradcam.png`` is rendered by the web tier on first request and
cached. The picture is the upload itself when it is small (no work at all: Redis renames the
bytes it already holds) and otherwise a JPEG thumbnail the worker encodes at the overlay's size.
A heatmap whose picture is lost is drawn alone (``render_alone``) at the image's aspect ratio.
Both tiers import this module, so it uses Pillow and numpy only.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from shared.pictures import decode

MAX_OVERLAY_SIDE = 384  # PNG encoding dominates rendering: ~9 ms at this size on one CPU core
ORIGINAL_PICTURE_MAX_BYTES = 256 * 1024  # uploads up to this size are kept as the overlay's picture
THUMBNAIL_QUALITY = 92
ALPHA = 0.5
DIM = 0.45  # brightness of the part of the picture the model's centre crop did not see
NO_PICTURE_GREY = 96  # the canvas of a heatmap drawn without its picture


def _jet_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    red = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([red, green, blue], axis=1) * 255).astype(np.uint8)


JET = _jet_lut()
_DIM_LUT = [round(v * DIM) for v in range(256)] * 3


def normalise(cam: np.ndarray) -> np.ndarray:
    """Scale a map to 0..1 (all zeros stays all zeros)."""
    cam = cam - cam.min()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def render_overlay(image: Image.Image, cam: np.ndarray,
                   crop_box: tuple[float, float, float, float]) -> bytes:
    """Blend ``cam`` (the model's view of ``crop_box``) over ``image`` at its own aspect ratio."""
    picture = image.copy()
    picture.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    box = _pixel_box(picture.size, crop_box)
    blended = Image.blend(picture.crop(box), _coloured(cam, box), ALPHA)
    canvas = picture.point(_DIM_LUT)  # outside the crop the model saw nothing: dim it
    canvas.paste(blended, box[:2])
    return _png(canvas)


def render_alone(cam: np.ndarray, crop_box: tuple[float, float, float, float], width: int, height: int) -> bytes:
    """Draw ``cam`` without its picture: on a grey canvas at the image's aspect ratio (``width`` x
    ``height``, fitted in the overlay's size), where ``crop_box`` lies in the image."""
    scale = min(1.0, MAX_OVERLAY_SIDE / max(width, height, 1))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new("RGB", size, (NO_PICTURE_GREY,) * 3)
    box = _pixel_box(size, crop_box)
    canvas.paste(_coloured(cam, box), box[:2])
    return _png(canvas)


def _pixel_box(size: tuple[int, int], crop_box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The crop box in pixels of a picture of ``size``, at least one pixel wide and high."""
    width, height = size
    left, top = round(crop_box[0] * width), round(crop_box[1] * height)
    return left, top, max(round(crop_box[2] * width), left + 1), max(round(crop_box[3] * height), top + 1)


def _coloured(cam: np.ndarray, box: tuple[int, int, int, int]) -> Image.Image:
    """The map scaled to ``box``'s size and coloured with the jet palette."""
    size = (box[2] - box[0], box[3] - box[1])
    heat = Image.fromarray(normalise(cam).astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    levels = np.clip(np.asarray(heat) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(JET[levels], "RGB")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def keeps_original(upload_bytes: int) -> bool:
    """Whether an upload is small enough to be kept whole as its overlay's picture."""
    return upload_bytes <= ORIGINAL_PICTURE_MAX_BYTES


def overlay_thumbnail(image: Image.Image) -> bytes:
    """Return the picture an overlay is drawn on, as a JPEG at the overlay's own size."""
    picture = image.copy()
    picture.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def picture_for(upload: bytes, *, min_short_side: int, max_pixels: int) -> bytes:
    """Return the picture an upload's heatmap is drawn on, as the worker keeps it: the upload itself
    when small, else a thumbnail of it (``min_short_side``: the model card's resize)."""
    if keeps_original(len(upload)):
        return upload
    return overlay_thumbnail(decode(upload, min_short_side=min_short_side, max_pixels=max_pixels).image)


def render_stored(picture: bytes, cam_map: list[list[float]], crop_box: list[float], *,
                  min_short_side: int, max_pixels: int) -> bytes:
    """Render the overlay PNG from a kept picture and a result's map and crop box.

    ``min_short_side`` is the model card's resize, so a kept upload decodes exactly as the worker
    decoded it (same JPEG draft scale) and the overlay is the one the worker would have drawn.
    """
    image = decode(picture, min_short_side=min_short_side, max_pixels=max_pixels).image
    return render_overlay(image, np.asarray(cam_map, dtype=np.float32), tuple(crop_box))
