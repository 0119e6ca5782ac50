"""Choose and describe the device a pool child computes on.

Called only inside a child process: touching CUDA in the parent before the pool forks breaks
every child ("Cannot re-initialize CUDA in forked subprocess", pytorch/pytorch#40403).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def choose_device(requested: str, child_index: int) -> torch.device:
    """Return the device for pool child ``child_index``.

    ``requested`` is ``auto`` (a GPU when one is visible, children spread over the visible GPUs),
    ``cpu``, ``cuda`` (spread like auto, but fail when no GPU is visible) or ``cuda:N``.
    CUDA_VISIBLE_DEVICES is honoured because torch only ever sees the devices it lists.
    """
    requested = requested.strip().lower()
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if not available or index >= torch.cuda.device_count():
            raise RuntimeError(f"WORKER_DEVICE={requested} but that CUDA device is not visible")
        return torch.device("cuda", index)
    if requested == "cuda" and not available:
        raise RuntimeError("WORKER_DEVICE=cuda but no CUDA device is visible")
    if requested not in ("auto", "cuda"):
        raise RuntimeError(f"WORKER_DEVICE must be auto, cpu, cuda or cuda:N, not {requested!r}")
    if available:
        return torch.device("cuda", child_index % torch.cuda.device_count())
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    """Return the device as users see it: ``cuda:0 (NVIDIA H100 ...)`` or ``cpu``."""
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def configure(device: torch.device, threads: int) -> None:
    """Set per-process torch knobs for the chosen device."""
    torch.set_num_threads(max(1, threads))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
