"""Render a GradCAM map as a colour heatmap blended over the upright image, as PNG."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_OVERLAY_SIDE = 384  # PNG encoding dominates rendering: ~9 ms at this size on one CPU core
ALPHA = 0.5
DIM = 0.45  # brightness of the part of the picture the model's centre crop did not see


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
    width, height = picture.size
    box = (round(crop_box[0] * width), round(crop_box[1] * height),
           max(round(crop_box[2] * width), round(crop_box[0] * width) + 1),
           max(round(crop_box[3] * height), round(crop_box[1] * height) + 1))
    size = (box[2] - box[0], box[3] - box[1])
    heat = Image.fromarray(normalise(cam).astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    levels = np.clip(np.asarray(heat) * 255, 0, 255).astype(np.uint8)
    coloured = Image.fromarray(JET[levels], "RGB")
    blended = Image.blend(picture.crop(box), coloured, ALPHA)
    canvas = picture.point(_DIM_LUT)  # outside the crop the model saw nothing: dim it
    canvas.paste(blended, box[:2])
    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=1)
    return out.getvalue()
