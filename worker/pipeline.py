"""The named steps of a batch: stage (decode -> preprocess -> keep a picture) -> compute -> results.

``stage`` is CPU work on one image and runs in the child's thread pool, so the next batch is
decoded while the device computes this one; a bad image fails alone. ``compute`` is one forward
pass for the whole batch, GradCAM included. ``results`` builds each image's stored result: the
predictions, the GradCAM map itself (h x w, 0..1) and the crop box, never an overlay image.
``run_batch`` chains the three for one batch (tests and benchmarks call it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from concurrent.futures import Executor

import numpy as np

from shared.errors import JobFailed
from shared.jobjson import GRADCAM_URL_SLOT
from shared.jobs import KEEP_UPLOAD, Picture
from shared.keys import OutputOptions
from shared.overlay import keeps_original, overlay_thumbnail
from shared.pictures import header_pixels
from worker.devices import describe
from worker.imaging import Prepared, decode, normalised_batch, preprocess
from worker.inference import BatchOutput, predict_batch, top_predictions_batch
from worker.models import LoadedModel
from worker.streams import DeviceInput

MAP_DECIMALS = 4  # the stored GradCAM map: 1e-4 steps, finer than the heatmap's 256 colours


@dataclasses.dataclass
class PipelineOutput:
    """The stored result JSON (without queue time) and the overlay's picture (None without GradCAM)."""

    result: dict
    picture: Picture


@dataclasses.dataclass
class Staged:
    """One image ready for the model."""

    index: int  # its place in the batch as taken
    options: OutputOptions
    prepared: Prepared
    picture: Picture
    decode_ms: float
    preprocess_ms: float
    retried: bool = False  # its computation crashed a worker before (it runs alone, last)


class PixelBudget:
    """How many decoded pixels a child may hold at once (MAX_BATCH_PIXELS), shared by every thread
    that decodes for it: a decode waits until its picture fits beside those already held.

    A picture bigger than the whole budget waits until it is alone, then goes ahead, so the
    budget bounds memory without refusing anything MAX_IMAGE_PIXELS lets through.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most pixels ever held at once
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        """Hold ``pixels`` of the budget for the block (waiting until they fit)."""
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + pixels <= self.limit)
            self.held += pixels
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._changed:
                self.held -= pixels
                self._changed.notify_all()


UNBOUNDED = PixelBudget(2 ** 62)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def stage(index: int, data: bytes, options: OutputOptions, model: LoadedModel, max_pixels: int,
          budget: PixelBudget = UNBOUNDED) -> Staged:
    """Decode and preprocess one upload; choose the picture its heatmap will be drawn on.

    The decoded picture holds its share of ``budget`` until only its small products are left.
    """
    with budget.hold(header_pixels(data)):
        start = time.perf_counter()
        decoded = decode(data, min_short_side=model.card.resize, max_pixels=max_pixels)
        decode_ms = _ms(start)
        step = time.perf_counter()
        prepared = preprocess(decoded.image, model.card)
        picture = None
        if options.gradcam:
            picture = KEEP_UPLOAD if keeps_original(len(data)) else overlay_thumbnail(decoded.image)
        del decoded
    return Staged(index, options, prepared, picture, decode_ms, _ms(step))


def stage_all(items: list[tuple[bytes, OutputOptions]], model: LoadedModel, max_pixels: int,
              pool: Executor | None = None,
              budget: PixelBudget = UNBOUNDED) -> tuple[list[Staged], dict[int, JobFailed]]:
    """Stage every item (in ``pool``'s threads when given, no more decoded pixels at once than
    ``budget`` allows); return the staged and the failures by index."""
    def attempt(index: int) -> Staged | JobFailed:
        try:
            return stage(index, items[index][0], items[index][1], model, max_pixels, budget)
        except JobFailed as exc:
            return exc

    outcomes = list(pool.map(attempt, range(len(items)))) if pool else [attempt(i) for i in range(len(items))]
    staged = [o for o in outcomes if isinstance(o, Staged)]
    return staged, {i: o for i, o in enumerate(outcomes) if not isinstance(o, Staged)}


def stage_on_device(items: list[tuple[bytes, OutputOptions]], model: LoadedModel, max_pixels: int,
                    pool: Executor | None = None, budget: PixelBudget = UNBOUNDED, stream=None,
                    ) -> tuple[list[Staged], dict[int, JobFailed], DeviceInput | None]:
    """Decode and preprocess a batch on the model's device (worker.device_decode: nvJPEG for JPEGs,
    the CPU path for anything it refuses), on the calling thread's ``stream``; return the staged
    images in the rows of the returned input batch, and the failures by index. Thumbnails for big
    uploads' heatmaps are made on the CPU meanwhile (in ``pool``'s threads when given)."""
    from worker.device_decode import decode_batch

    start = time.perf_counter()
    wanted = [i for i, (data, options) in enumerate(items) if options.gradcam and not keeps_original(len(data))]
    thumbnails = {i: (pool.submit if pool else _now)(_thumbnail, items[i][0], model, max_pixels, budget)
                  for i in wanted}
    batch = decode_batch([data for data, _ in items], model.card, model.device, max_pixels=max_pixels,
                         budget=budget, stream=stream)
    decode_ms = round(_ms(start) / max(1, len(items)), 2)  # the batch's decode, shared out per image
    staged = []
    for row, index in enumerate(batch.rows):
        options = items[index][1]
        picture = (thumbnails[index].result() if index in thumbnails else KEEP_UPLOAD) if options.gradcam else None
        staged.append(Staged(index, options, Prepared(None, batch.crop_boxes[row], model.card), picture,
                             decode_ms, 0.0))
    return staged, dict(batch.failures), (batch.handover() if staged else None)


class _now:
    """A finished future: the result of calling ``fn`` right away (no pool to run it in)."""

    def __init__(self, fn, *args):
        self.value = fn(*args)

    def result(self):
        return self.value


def _thumbnail(data: bytes, model: LoadedModel, max_pixels: int, budget: PixelBudget) -> Picture:
    try:
        with budget.hold(header_pixels(data)):
            return overlay_thumbnail(decode(data, min_short_side=model.card.resize, max_pixels=max_pixels).image)
    except JobFailed:
        return None  # decoded on the device but not by Pillow: the job has its map, not a heatmap PNG


def compute(model: LoadedModel, staged: list[Staged], amp_dtype: str,
            inputs: DeviceInput | None = None, pad_to: int | None = None) -> BatchOutput:
    """One forward pass (and GradCAM, if any image asks for it) over the staged images.

    ``inputs`` is the batch already on the device (``stage_on_device``); otherwise the staged 8-bit
    crops are stacked and normalised here. ``pad_to``: run the batch at that size (see predict_batch).
    """
    if inputs is None:
        batch = normalised_batch([s.prepared.pixels for s in staged], model.card, model.device)
    else:
        batch = inputs.take()
    return predict_batch(model, batch, gradcam=any(s.options.gradcam for s in staged), amp_dtype=amp_dtype,
                         pad_to=pad_to)


def results(model: LoadedModel, staged: list[Staged], batch: BatchOutput) -> list[PipelineOutput]:
    """Each staged image's stored result, in order."""
    predictions = top_predictions_batch(batch.probabilities, model.labels, [s.options.top_k for s in staged])
    # float64 before rounding: float32 values would print as 0.23389999568462372 in the JSON
    maps = None if batch.cams is None else np.round(batch.cams.numpy().astype(np.float64), MAP_DECIMALS).tolist()
    classes = None if batch.cam_classes is None else batch.cam_classes.tolist()
    inference_ms, gradcam_ms = round(batch.inference_ms, 2), round(batch.gradcam_ms, 2)
    device = describe(model.device)
    outputs = []
    for row, item in enumerate(staged):
        gradcam = None
        if item.options.gradcam:
            gradcam = {"class_index": classes[row], "label": model.labels[classes[row]], "url": GRADCAM_URL_SLOT,
                       "map": maps[row], "crop_box": [round(v, 6) for v in item.prepared.crop_box]}
        cam_ms = gradcam_ms if item.options.gradcam else 0.0
        outputs.append(PipelineOutput({
            "predictions": predictions[row], "gradcam": gradcam, "device": device, "batch_size": len(staged),
            "timings_ms": {"decode": item.decode_ms, "preprocess": item.preprocess_ms, "inference": inference_ms,
                           "gradcam": cam_ms, "render": 0.0,
                           "total": round(item.decode_ms + item.preprocess_ms + inference_ms + cam_ms, 2)},
        }, item.picture))
    return outputs


def run_batch(model: LoadedModel, items: list[tuple[bytes, OutputOptions]], *, max_pixels: int,
              amp_dtype: str, pool: Executor | None = None) -> list[PipelineOutput | JobFailed]:
    """Classify a batch of uploaded images of one model; explain those that ask for GradCAM.

    Returns one entry per item, in order: its output, or the JobFailed that stopped it.
    """
    staged, failures = stage_all(items, model, max_pixels, pool)
    outputs: list[PipelineOutput | JobFailed | None] = [failures.get(i) for i in range(len(items))]
    if staged:
        for item, output in zip(staged, results(model, staged, compute(model, staged, amp_dtype))):
            outputs[item.index] = output
    return outputs
