"""Run a batch of prepared images through a resident model, with optional GradCAM.

Plain functions, testable without Celery: ``predict`` does the forward (and GradCAM) pass and
``top_predictions`` turns probabilities into the contract's prediction list.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from worker.gradcam import forward_with_cam
from worker.models import LoadedModel
from worker.timing import Stopwatch

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class BatchOutput:
    """Per-image probabilities (N x C, float32, CPU) and GradCAM maps (N x h x w, 0..1) when asked."""

    probabilities: torch.Tensor
    cams: torch.Tensor | None  # each map scaled to 0..1 (min-max per image; an all-zero map stays zero)
    cam_classes: torch.Tensor | None
    inference_ms: float
    gradcam_ms: float


def _autocast(device: torch.device, amp_dtype: str):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp_dtype])
    return contextlib.nullcontext()  # CPU: fp32 with channels_last is the fast path


def to_device(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack images into one channels_last batch on ``device`` (pinned, async copy on CUDA)."""
    batch = torch.stack(tensors)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch.contiguous(memory_format=torch.channels_last)


def predict(model: LoadedModel, tensors: list[torch.Tensor], *, gradcam: bool,
            amp_dtype: str = "float16") -> BatchOutput:
    """Classify a list of normalised 3 x S x S images; with ``gradcam`` also explain each top-1 class."""
    return predict_batch(model, to_device(tensors, model.device), gradcam=gradcam, amp_dtype=amp_dtype)


def unit_range(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map of an N x h x w batch to 0..1 (an all-zero map stays all zeros)."""
    flat = cams.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low)
    return torch.where(span > 0, (cams - low) / span.clamp_min(1e-12), torch.zeros_like(cams))


def pad_rows(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``batch`` followed by zero images up to ``size`` rows (channels_last, as the model runs)."""
    if size <= batch.shape[0]:
        return batch
    padded = batch.new_zeros((size, *batch.shape[1:])).contiguous(memory_format=torch.channels_last)
    padded[:batch.shape[0]] = batch
    return padded


def predict_batch(model: LoadedModel, batch: torch.Tensor, *, gradcam: bool,
                  amp_dtype: str = "float16", pad_to: int | None = None) -> BatchOutput:
    """Classify a batch already on the model's device; with ``gradcam`` explain each top-1 class too.

    ``pad_to`` runs the batch at that many rows (zero images after the real ones, whose outputs
    are dropped): with cuDNN autotuning, every new batch shape re-tunes every convolution, so a
    GPU child runs only the shapes it warmed. Rows are independent in eval mode, so the padding
    changes no real row's answer or GradCAM map.
    """
    count = batch.shape[0]
    batch = pad_rows(batch, pad_to or count)
    with _autocast(model.device, amp_dtype):
        if gradcam:
            # GradCAM shares the forward pass; its own cost is the short backward to the target layer.
            cam_pass = forward_with_cam(model.network, model.target_layer, batch)
            probabilities = cam_pass.logits[:count].float().softmax(dim=1).cpu()
            return BatchOutput(probabilities, unit_range(cam_pass.cams[:count]).cpu(),
                               cam_pass.class_index[:count].cpu(), cam_pass.forward_ms, cam_pass.backward_ms)
        clock = Stopwatch(batch.device)
        clock.mark()
        with torch.inference_mode():
            logits = model.network(batch)
        clock.mark()
        probabilities = logits[:count].float().softmax(dim=1).cpu()
    return BatchOutput(probabilities, None, None, clock.elapsed_ms(0, 1), 0.0)


def top_predictions(probabilities: torch.Tensor, labels: tuple[str, ...], k: int) -> list[dict]:
    """Return the ``k`` most probable classes of one image as the contract's prediction list."""
    return top_predictions_batch(probabilities[None], labels, [k])[0]


def top_predictions_batch(probabilities: torch.Tensor, labels: tuple[str, ...], ks: list[int]) -> list[list[dict]]:
    """The prediction list of every row of an N x C batch (row i keeps its ``ks[i]`` best), in one topk."""
    scores, indices = probabilities.topk(min(max(ks), probabilities.shape[1]), dim=1)
    return [[{"label": labels[i], "index": i, "score": round(s, 6)} for s, i in zip(row_s[:k], row_i[:k])]
            for row_s, row_i, k in zip(scores.tolist(), indices.tolist(), ks)]
