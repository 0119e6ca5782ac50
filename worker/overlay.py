"""Render a GradCAM map as a colour heatmap blended over the upright image, as PNG."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_OVERLAY_SIDE = 640
ALPHA = 0.5


def _jet_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    red = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([red, green, blue], axis=1) * 255).astype(np.uint8)


JET = _jet_lut()


def normalise(cam: np.ndarray) -> np.ndarray:
    """Scale a map to 0..1 (all zeros stays all zeros)."""
    cam = cam - cam.min()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def render_overlay(image: Image.Image, cam: np.ndarray,
                   crop_box: tuple[float, float, float, float]) -> bytes:
    """Blend ``cam`` (the model's view of ``crop_box``) over ``image`` at its own aspect ratio."""
    picture = image.copy()
    picture.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE), Image.Resampling.BILINEAR)
    width, height = picture.size
    left, top = round(crop_box[0] * width), round(crop_box[1] * height)
    right, bottom = round(crop_box[2] * width), round(crop_box[3] * height)
    heat = Image.fromarray(normalise(cam).astype(np.float32), mode="F")
    heat = heat.resize((max(1, right - left), max(1, bottom - top)), Image.Resampling.BILINEAR)
    levels = np.clip(np.asarray(heat) * 255, 0, 255).astype(np.uint8)
    base = np.asarray(picture, dtype=np.float32)
    # Outside the crop the model saw nothing: dim it rather than invent a heatmap there.
    blended = base * 0.45
    region = base[top:bottom, left:right]
    coloured = JET[levels].astype(np.float32)
    blended[top:bottom, left:right] = region * (1 - ALPHA) + coloured * ALPHA
    out = io.BytesIO()
    Image.fromarray(blended.astype(np.uint8), "RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()
