"""Preprocess an upright picture for a model card; stack a batch of them into the model's input.

Decoding lives in shared.pictures (the web tier decodes the same way to draw heatmaps). Pictures
stay 8-bit until the whole batch is stacked: one uint8 copy per image, then a single fused
float conversion and normalisation per batch, on the device that runs the model.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from shared.cards import ModelCard
from shared.pictures import ALLOWED_FORMATS, Decoded, decode, to_rgb

__all__ = ["ALLOWED_FORMATS", "Decoded", "Prepared", "decode", "normalise_on_device", "normalised_batch",
           "preprocess", "to_rgb"]


@dataclasses.dataclass
class Prepared:
    """The model input for one image (8-bit, S x S x 3) and where its crop sits in the upright image."""

    pixels: np.ndarray | None  # S x S x 3, uint8, the centre crop after resizing (None: made on the device)
    crop_box: tuple[float, float, float, float]  # left, top, right, bottom as fractions of the image
    card: ModelCard

    @property
    def tensor(self) -> torch.Tensor:
        """The normalised 3 x S x S float32 input of this image alone."""
        return normalised_batch([self.pixels], self.card, torch.device("cpu"))[0]


def preprocess(image: Image.Image, card: ModelCard) -> Prepared:
    """Resize the shorter side to ``card.resize`` and centre-crop ``card.input_size`` (8-bit).

    Only the region that survives the crop is resampled (``resize(box=...)``), so a 10000x10 strip
    costs the same as a square photo instead of becoming a 256000x256 intermediate.
    """
    width, height = image.size
    side = card.input_size * min(width, height) / card.resize  # the crop, in source pixels
    left, top = (width - side) / 2, (height - side) / 2
    size = (card.input_size, card.input_size)
    crop = image.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)
    box = (left / width, top / height, (left + side) / width, (top + side) / height)
    return Prepared(np.asarray(crop), box, card)


def normalised_batch(pixels: list[np.ndarray], card: ModelCard, device: torch.device) -> torch.Tensor:
    """Stack 8-bit S x S x 3 crops into a normalised N x 3 x S x S float batch on ``device``.

    The stacked N x S x S x 3 array seen as N x 3 x S x S is already channels_last, the layout the
    model runs fastest in. On CUDA the 8-bit batch (a quarter of the float bytes) crosses from
    pinned memory without blocking and is converted there; on the CPU numpy converts it in place
    (a third of the cost of the same arithmetic in torch at these sizes).
    """
    stacked = np.stack(pixels)
    if device.type == "cuda":
        batch = torch.from_numpy(stacked).pin_memory().to(device, non_blocking=True)
        return normalise_on_device(batch.permute(0, 3, 1, 2), card)
    scale, shift = _normalisation(card, torch.device("cpu"))
    floats = stacked.astype(np.float32)
    floats *= scale.numpy().reshape(3)
    floats -= shift.numpy().reshape(3)
    return torch.from_numpy(floats).permute(0, 3, 1, 2)


def normalise_on_device(batch: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """Normalise an 8-bit N x 3 x S x S batch where it is; the result is float32 and channels_last."""
    scale, shift = _normalisation(card, batch.device)
    return torch.addcmul(-shift, batch, scale, value=1).contiguous(memory_format=torch.channels_last)


_NORMALISATIONS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalisation(card: ModelCard, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, shift) with x * scale - shift == (x / 255 - mean) / std, cached per card and device."""
    key = (card.mean, card.std, str(device))
    if key not in _NORMALISATIONS:
        mean = torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1)
        _NORMALISATIONS[key] = ((1.0 / (255.0 * std)).to(device), (mean / std).to(device))
    return _NORMALISATIONS[key]
