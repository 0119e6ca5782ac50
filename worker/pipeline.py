"""The named steps of one computation: decode -> preprocess -> predict (+ explain) -> render."""
from __future__ import annotations

import dataclasses
import time

from shared.keys import OutputOptions
from worker.devices import describe
from worker.imaging import decode, preprocess
from worker.inference import predict, top_predictions
from worker.models import LoadedModel
from worker.overlay import render_overlay


@dataclasses.dataclass
class PipelineOutput:
    """The stored result JSON (without queue time) and the overlay PNG (None without GradCAM)."""

    result: dict
    overlay_png: bytes | None


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def run_pipeline(model: LoadedModel, data: bytes, options: OutputOptions, *,
                 max_pixels: int, amp_dtype: str) -> PipelineOutput:
    """Classify one uploaded image and, when asked, explain and render its top-1 class."""
    card = model.card
    start = time.perf_counter()
    decoded = decode(data, min_short_side=card.resize, max_pixels=max_pixels)
    decode_ms = _ms(start)
    step = time.perf_counter()
    prepared = preprocess(decoded.image, card)
    preprocess_ms = _ms(step)
    output = predict(model, [prepared.tensor], gradcam=options.gradcam, amp_dtype=amp_dtype)
    overlay, gradcam, render_ms = None, None, 0.0
    if output.cams is not None:
        step = time.perf_counter()
        overlay = render_overlay(decoded.image, output.cams[0].numpy(), prepared.crop_box)
        render_ms = _ms(step)
        gradcam = {"class_index": int(output.cam_classes[0])}
    result = {
        "predictions": top_predictions(output.probabilities[0], model.labels, options.top_k),
        "gradcam": gradcam,
        "device": describe(model.device),
        "timings_ms": {
            "decode": decode_ms, "preprocess": preprocess_ms,
            "inference": round(output.inference_ms, 2), "gradcam": round(output.gradcam_ms, 2),
            "render": render_ms, "total": _ms(start),
        },
    }
    return PipelineOutput(result, overlay)
