"""The named steps of a batch of computations: decode -> preprocess -> predict (+ explain) -> render.

Images are decoded and preprocessed one by one (a bad one fails alone), then go through the model
in one forward pass; GradCAM shares that pass.
"""
from __future__ import annotations

import dataclasses
import time

from shared.errors import JobFailed
from shared.jobs import GRADCAM_URL_SLOT
from shared.keys import OutputOptions
from worker.devices import describe
from worker.imaging import Decoded, Prepared, decode, preprocess
from worker.inference import predict, top_predictions
from worker.models import LoadedModel
from worker.overlay import render_overlay


@dataclasses.dataclass
class PipelineOutput:
    """The stored result JSON (without queue time) and the overlay PNG (None without GradCAM)."""

    result: dict
    overlay_png: bytes | None


@dataclasses.dataclass
class _Staged:
    index: int
    options: OutputOptions
    decoded: Decoded
    prepared: Prepared
    decode_ms: float
    preprocess_ms: float


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _stage(index: int, data: bytes, options: OutputOptions, model: LoadedModel, max_pixels: int) -> _Staged:
    start = time.perf_counter()
    decoded = decode(data, min_short_side=model.card.resize, max_pixels=max_pixels)
    decode_ms = _ms(start)
    step = time.perf_counter()
    prepared = preprocess(decoded.image, model.card)
    return _Staged(index, options, decoded, prepared, decode_ms, _ms(step))


def run_batch(model: LoadedModel, items: list[tuple[bytes, OutputOptions]], *, max_pixels: int,
              amp_dtype: str) -> list[PipelineOutput | JobFailed]:
    """Classify a batch of uploaded images of one model; explain those that ask for GradCAM.

    Returns one entry per item, in order: its output, or the JobFailed that stopped it.
    """
    outputs: list[PipelineOutput | JobFailed | None] = [None] * len(items)
    staged: list[_Staged] = []
    for index, (data, options) in enumerate(items):
        try:
            staged.append(_stage(index, data, options, model, max_pixels))
        except JobFailed as exc:
            outputs[index] = exc
    if not staged:
        return outputs
    batch = predict(model, [s.prepared.tensor for s in staged],
                    gradcam=any(s.options.gradcam for s in staged), amp_dtype=amp_dtype)
    for row, item in enumerate(staged):
        outputs[item.index] = _finish(model, item, batch, row, len(staged))
    return outputs


def _finish(model: LoadedModel, item: _Staged, batch, row: int, batch_size: int) -> PipelineOutput:
    overlay, gradcam, render_ms = None, None, 0.0
    if item.options.gradcam:
        step = time.perf_counter()
        overlay = render_overlay(item.decoded.image, batch.cams[row].numpy(), item.prepared.crop_box)
        render_ms = _ms(step)
        gradcam = {"class_index": int(batch.cam_classes[row]), "url": GRADCAM_URL_SLOT}
    inference_ms, gradcam_ms = round(batch.inference_ms, 2), round(batch.gradcam_ms, 2)
    result = {
        "predictions": top_predictions(batch.probabilities[row], model.labels, item.options.top_k),
        "gradcam": gradcam,
        "device": describe(model.device),
        "batch_size": batch_size,
        "timings_ms": {
            "decode": item.decode_ms, "preprocess": item.preprocess_ms,
            "inference": inference_ms, "gradcam": gradcam_ms if item.options.gradcam else 0.0,
            "render": render_ms,
            "total": round(item.decode_ms + item.preprocess_ms + inference_ms + gradcam_ms + render_ms, 2),
        },
    }
    return PipelineOutput(result, overlay)
