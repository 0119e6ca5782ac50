"""The device's part of a batch, and what a child does when the device fails it.

- Batch sizes: a start-up guess (worker.batching), and on a GPU every shape a batch may run at is
  warmed before the child takes work; each batch is padded to one of them, so cuDNN's autotuner
  never meets a new shape under load (hundreds of ms and a workspace spike each time).
- Out of device memory: only that batch's size is lost. The size and every bigger one leave the
  sizer, the allocator's cache is freed, and the images run again in halves.
- A fatal device error (an illegal address, a launch failure: every later CUDA call fails too):
  the child exits, so the pool replaces it with one that has a working device. It does not fail
  the batch: the sweeper sends its computations again when the heartbeat stops, and the attempts
  counter isolates the one that caused it (it runs alone, and fails ``worker_crashed`` after
  ``MAX_ATTEMPTS``).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import torch

from shared.settings import Settings
from worker.batching import BatchSizer, best_batch_size
from worker.devices import is_fatal
from worker.inference import predict, predict_batch
from worker.models import LoadedModel
from worker.pipeline import PipelineOutput, Staged, compute, results
from worker.streams import DeviceInput

log = logging.getLogger(__name__)
CPU_BATCHES = (1, 2, 4, 8)  # measured at start-up; the sizer may move on to bigger ones under load
CPU_SIZER_BATCHES = (1, 2, 4, 8, 16, 32, 64)
CUDA_BATCHES = (1, 2, 4, 8, 16, 32, 64)
CUDA_SIZER_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EXIT_DEVICE_FAULT = 70  # EX_SOFTWARE: the exit status of a child whose device broke


def warm_up(model: LoadedModel, amp_dtype: str) -> None:
    """Run one dummy batch so the first real job does not pay for lazy initialisation."""
    size = model.card.input_size
    predict(model, [torch.zeros(3, size, size)], gradcam=True, amp_dtype=amp_dtype)


def make_sizer(settings: Settings, model: LoadedModel) -> BatchSizer:
    """A fixed MAX_BATCH, or a start-up measurement that load then refines; on a GPU, every shape
    the sizer may run is warmed (one that runs out of memory is forbidden)."""
    cuda = model.device.type == "cuda"
    if settings.max_batch:
        sizer = BatchSizer(settings.max_batch, (settings.max_batch,), fixed=True)
    else:
        initial = best_batch_size(model, settings.amp_dtype, CUDA_BATCHES if cuda else CPU_BATCHES)
        sizer = BatchSizer(initial, CUDA_SIZER_BATCHES if cuda else CPU_SIZER_BATCHES)
    if cuda:
        warm_shapes(model, settings.amp_dtype, sizer)
    return sizer


def warm_shapes(model: LoadedModel, amp_dtype: str, sizer: BatchSizer) -> None:
    """Run forward + GradCAM once at every shape of ``sizer`` (cuDNN tunes each shape once, here)."""
    for shape in sizer.shapes:
        if not _runs(model, amp_dtype, shape):
            sizer.forbid(shape)
            free_device_memory(model.device)
            break
    log.info("%s on %s: warmed batch shapes %s", model.card.name, model.device, sizer.shapes)


def _runs(model: LoadedModel, amp_dtype: str, shape: int) -> bool:
    """Run forward + GradCAM on ``shape`` zero images; False when that runs out of device memory."""
    size = model.card.input_size
    try:
        batch = torch.zeros(shape, 3, size, size, device=model.device)
        predict_batch(model, batch.contiguous(memory_format=torch.channels_last), gradcam=True, amp_dtype=amp_dtype)
    except torch.OutOfMemoryError:
        return False
    return True


def pad_size(model: LoadedModel, sizer: BatchSizer | None, count: int) -> int | None:
    """The shape a batch of ``count`` runs at: a warmed one on a GPU, its own size on the CPU."""
    if sizer is None or model.device.type != "cuda":
        return None
    return sizer.padded(count)


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def forward(model: LoadedModel, staged: list[Staged], inputs: DeviceInput | None, amp_dtype: str,
            sizer: BatchSizer | None) -> list[tuple[list[Staged], list[PipelineOutput]]]:
    """Compute one group's images; on running out of device memory, forbid that size and run halves.

    Returns the parts as computed (the whole group, or its halves, and so on), each with its outputs.
    """
    padded = pad_size(model, sizer, len(staged))
    try:
        return [(staged, results(model, staged, compute(model, staged, amp_dtype, inputs, padded)))]
    except torch.OutOfMemoryError:
        if len(staged) == 1:
            raise
        log.warning("a batch of %d (run at %d) on %s ran out of memory; running it in halves",
                    len(staged), padded or len(staged), model.device)
    if sizer is not None:
        sizer.forbid(padded or len(staged))
    free_device_memory(model.device)
    half = len(staged) // 2
    parts = []
    for start, stop in ((0, half), (half, len(staged))):
        part = inputs.rows(start, stop) if inputs is not None else None
        parts += forward(model, staged[start:stop], part, amp_dtype, sizer)
    return parts


def exit_if_fatal(exc: BaseException, before_exit: Callable[[], None] = lambda: None) -> None:
    """Replace this process if ``exc`` broke its device: run ``before_exit``, then exit at once.

    ``os._exit``: Python's own shutdown would call into the broken CUDA context again.
    """
    if not is_fatal(exc):
        return
    log.critical("fatal device error, this child exits so that the pool replaces it: %s: %s",
                 type(exc).__name__, exc)
    try:
        before_exit()
    except Exception:  # exiting is what matters now
        log.exception("cleaning up before the exit failed")
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_DEVICE_FAULT)
