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
        # Autotuning picks the fastest kernels per input shape; a child runs only the batch shapes
        # it warmed at start-up (runtime pads batches to them), so it never tunes under load.
        torch.backends.cudnn.benchmark = True
    full_fp32_products()


def full_fp32_products() -> None:
    """Keep float32 matrix products and convolutions in full fp32, never TF32.

    The device decode path resizes with fp32 matrix products that must land within one 8-bit level
    of Pillow; TF32's 10-bit mantissa moves 3-9% of pixels a level. The model runs under fp16/bf16
    autocast and gains nothing from TF32.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# Raised by CUDA once the context is broken: every later call on the device fails the same way.
_STICKY = ("illegal memory access", "illegal address", "unspecified launch failure", "launch failure",
           "device-side assert", "misaligned address", "illegal instruction", "hardware stack error",
           "uncorrectable ecc", "device not ready", "cuda error: unknown error", "status_execution_failed",
           "status_internal_error", "nvjpeg_status_execution_failed")


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the device unusable for this process (a CUDA error, not out of memory).

    After an illegal address or a launch failure every later CUDA call fails: the process must
    be replaced, not kept failing jobs (and heartbeats) while it looks absent.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, torch.AcceleratorError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("cuda error" in text or any(s in text for s in _STICKY))
