"""Choose and describe the device a pool child computes on.

Called only inside a child process: touching CUDA in the parent before the pool forks breaks
every child ("Cannot re-initialize CUDA in forked subprocess", pytorch/pytorch#40403).
"""
from __future__ import annotations

import logging
import platform

import torch

log = logging.getLogger(__name__)


def choose_device(planned: str) -> torch.device:
    """Return the torch device for a child's planned device, ``cpu`` or ``cuda:N`` (see device_plan).

    CUDA_VISIBLE_DEVICES is honoured because torch only ever sees the devices it lists.
    """
    if planned == "cpu":
        return torch.device("cpu")
    if not planned.startswith("cuda:"):
        raise RuntimeError(f"a child's device must be cpu or cuda:N, not {planned!r}")
    index = int(planned.split(":", 1)[1])
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise RuntimeError(f"this child was planned on {planned} but that CUDA device is not visible")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """Return the hardware's name: the GPU model, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def gpu_memory(device: torch.device) -> dict:
    """Return ``{"used": bytes, "total": bytes}`` of the whole GPU (empty on CPU)."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"used": total - free, "total": total}


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
