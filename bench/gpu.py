"""GPU busy share during a run, sampled with nvidia-smi (no Python NVML binding needed)."""
from __future__ import annotations

import shutil
import subprocess


class GpuBusy:
    """``with GpuBusy() as busy: ...`` then ``busy.summary()``: mean and peak utilisation per GPU."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.proc: subprocess.Popen | None = None
        self.samples: list[list[float]] = []

    def __enter__(self) -> "GpuBusy":
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        output, _ = self.proc.communicate(timeout=10)
        for line in output.splitlines():
            try:
                self.samples.append([float(v) for v in line.split(",")])
            except ValueError:
                continue  # a partial line cut by terminate()

    def summary(self) -> dict | None:
        """Mean and peak busy percent and peak memory (MiB) over the samples; None without a GPU."""
        if not self.samples:
            return None
        busy = [s[0] for s in self.samples]
        return {"busy_mean_percent": sum(busy) / len(busy), "busy_peak_percent": max(busy),
                "memory_peak_mib": max(s[1] for s in self.samples), "samples": len(busy)}
