"""Run a batch of prepared images through a resident model, with optional GradCAM.

Plain functions, testable without Celery: ``predict`` does the forward (and GradCAM) pass and
``top_predictions`` turns probabilities into the contract's prediction list.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from worker.gradcam import forward_with_cam
from worker.models import LoadedModel

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class BatchOutput:
    """Per-image probabilities (N x C, float32, CPU) and GradCAM maps (N x h x w) when asked."""

    probabilities: torch.Tensor
    cams: torch.Tensor | None
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
    """Classify a batch; with ``gradcam`` also explain each image's top-1 class in the same pass."""
    batch = to_device(tensors, model.device)
    with _autocast(model.device, amp_dtype):
        if gradcam:
            # GradCAM shares the forward pass; its own cost is the short backward to the target layer.
            cam_pass = forward_with_cam(model.network, model.target_layer, batch)
            return BatchOutput(cam_pass.logits.float().softmax(dim=1).cpu(), cam_pass.cams.cpu(),
                               cam_pass.class_index.cpu(), cam_pass.forward_ms, cam_pass.backward_ms)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = model.network(batch)
        probabilities = logits.float().softmax(dim=1).cpu()
    return BatchOutput(probabilities, None, None, (time.perf_counter() - start) * 1000, 0.0)


def top_predictions(probabilities: torch.Tensor, labels: tuple[str, ...], k: int) -> list[dict]:
    """Return the ``k`` most probable classes of one image as the contract's prediction list."""
    scores, indices = probabilities.topk(min(k, probabilities.numel()))
    return [{"label": labels[i], "index": int(i), "score": round(float(s), 6)}
            for s, i in zip(scores.tolist(), indices.tolist())]
