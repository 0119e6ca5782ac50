"""Decide, in the worker's main process, how many pool children start and which device each gets.

Torch-free on purpose: the main process must never initialise CUDA before the pool forks
(pytorch/pytorch#40403), so visible GPUs are counted from CUDA_VISIBLE_DEVICES or ``nvidia-smi -L``.
"""
from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger(__name__)


class DevicePlanError(RuntimeError):
    """WORKER_DEVICES names devices this host does not have."""


def visible_gpus(cuda_visible_devices: str | None) -> int:
    """Count the GPUs torch will see, without touching CUDA."""
    if cuda_visible_devices is not None:
        entries = [part.strip() for part in cuda_visible_devices.split(",") if part.strip()]
        # CUDA stops at the first invalid entry; "-1" is the common way to hide every GPU.
        count = 0
        for entry in entries:
            if entry.startswith("-"):
                break
            count += 1
        return count
    return _nvidia_smi_count()


def _nvidia_smi_count() -> int:
    """Count GPUs listed by ``nvidia-smi -L`` (0 when the tool or the driver is missing)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return 0
    try:
        listing = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        log.warning("nvidia-smi -L failed; assuming no GPU", exc_info=True)
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def plan_devices(spec: str, per_device: int, gpus: int) -> list[str]:
    """Return one device per pool child: ``cuda:N`` or ``cpu``.

    ``auto``: the visible GPUs, else the CPU; ``cpu``: the CPU; ``0,2``: those GPU indices (one the
    host lacks is an error). Each device gets ``per_device`` children (WORKER_CONCURRENCY, default 1),
    spread round-robin so that the first children land on different GPUs.
    """
    if spec == "cpu" or (spec == "auto" and gpus == 0):
        chosen = ["cpu"]
    elif spec == "auto":
        chosen = [f"cuda:{index}" for index in range(gpus)]
    else:
        indices = [int(part) for part in spec.split(",")]
        missing = [index for index in indices if index >= gpus]
        if missing:
            raise DevicePlanError(f"WORKER_DEVICES={spec} names GPU {missing[0]} but this host shows "
                                  f"{gpus} GPU(s)")
        chosen = [f"cuda:{index}" for index in indices]
    return chosen * max(1, per_device)


def device_for_child(plan: list[str], child_index: int) -> str:
    """Return the device of pool child ``child_index`` (children added by pool_grow wrap around)."""
    return plan[child_index % len(plan)]
