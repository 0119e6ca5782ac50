"""Decide, in the worker's main process, how many pool children start and which device each gets.

Torch-free on purpose: the main process must never initialise CUDA before the pool forks
(pytorch/pytorch#40403), so visible GPUs are counted from CUDA_VISIBLE_DEVICES and ``nvidia-smi``.
What would make every GPU child crash in a loop is said once, here, before any child starts: a
driver older than the CUDA that the installed torch was built for, or CUDA_VISIBLE_DEVICES
naming GPUs that the host lacks.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA compatibility tables).
MIN_DRIVER = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}


class DevicePlanError(RuntimeError):
    """WORKER_DEVICES or CUDA_VISIBLE_DEVICES names devices this host does not have, or its driver
    cannot run the installed torch."""


@dataclasses.dataclass(frozen=True)
class HostGpu:
    """One GPU as ``nvidia-smi`` lists it."""

    index: int
    uuid: str
    driver: str


def host_gpus() -> list[HostGpu]:
    """The host's GPUs from ``nvidia-smi`` (none when the tool or the driver is missing)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        listing = subprocess.run([tool, "--query-gpu=index,uuid,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        log.warning("nvidia-smi failed; assuming no GPU", exc_info=True)
        return []
    return parse_gpus(listing.stdout)


def parse_gpus(text: str) -> list[HostGpu]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,driver_version --format=csv,noheader`` output."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            gpus.append(HostGpu(int(parts[0]), parts[1], parts[2]))
    return gpus


def check_visible_devices(cuda_visible_devices: str | None, gpus: list[HostGpu]) -> None:
    """Refuse a CUDA_VISIBLE_DEVICES whose entries the host lacks (CUDA would silently stop there)."""
    if cuda_visible_devices is None or not gpus:
        return
    for entry in (part.strip() for part in cuda_visible_devices.split(",") if part.strip()):
        if entry.startswith("-"):
            return  # hides the rest on purpose
        found = (entry.isdigit() and int(entry) < len(gpus)) or any(g.uuid.startswith(entry) for g in gpus)
        if not found:
            have = ", ".join(f"{g.index} ({g.uuid})" for g in gpus)
            raise DevicePlanError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices} names GPU {entry}, which this "
                                  f"host does not have; it has {len(gpus)}: {have}")


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU build), read without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None
    found = re.search(r"^cuda\b[^=]*=\s*['\"]([\d.]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


def driver_problem(driver: str, cuda: str | None) -> str | None:
    """Why ``driver`` cannot run torch built for CUDA ``cuda``, in words; None when it can."""
    if cuda is None:
        return None
    needed = MIN_DRIVER.get(int(cuda.split(".")[0]))
    try:
        if needed is None or _version(driver) >= _version(needed):
            return None
    except ValueError:
        return None  # an unknown format: let CUDA itself judge
    return (f"the NVIDIA driver {driver} is older than CUDA {cuda} (the installed torch's) needs: "
            f"{needed} or newer. Upgrade the driver, or install a torch built for an older "
            f"CUDA, or run on the CPU with WORKER_DEVICES=cpu")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def check_gpu_host(cuda_visible_devices: str | None, gpus: list[HostGpu], torch_cuda: str | None) -> None:
    """Refuse, once and in words, a GPU host on which every GPU child would crash in a loop."""
    check_visible_devices(cuda_visible_devices, gpus)
    problem = next((p for p in (driver_problem(g.driver, torch_cuda) for g in gpus) if p), None)
    if problem:
        raise DevicePlanError(problem)


def visible_gpus(cuda_visible_devices: str | None, gpus: list[HostGpu] | None = None) -> int:
    """Count the GPUs torch will see, without touching CUDA (``gpus``: the host's, when known)."""
    if cuda_visible_devices is not None:
        entries = [part.strip() for part in cuda_visible_devices.split(",") if part.strip()]
        # CUDA stops at the first invalid entry; "-1" is the common way to hide every GPU.
        count = 0
        for entry in entries:
            if entry.startswith("-"):
                break
            count += 1
        return count
    return len(host_gpus() if gpus is None else gpus)


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


def plan_host(spec: str, per_device: int, cuda_visible_devices: str | None) -> list[str]:
    """The plan for this host (see plan_devices), after refusing a host whose GPU children could
    not start (check_gpu_host). WORKER_DEVICES=cpu looks at no GPU at all."""
    if spec == "cpu":
        return plan_devices(spec, per_device, 0)
    gpus = host_gpus()
    plan = plan_devices(spec, per_device, visible_gpus(cuda_visible_devices, gpus))
    if any(device != "cpu" for device in plan):
        check_gpu_host(cuda_visible_devices, gpus, torch_cuda_version())
    return plan
