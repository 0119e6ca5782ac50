"""Time device work without making the host wait for it.

On a GPU, kernels run after the call that queues them returns, so host clocks measure launches,
and ``torch.cuda.synchronize`` (which waits for every stream of the device) would stall the
pipeline twice per batch. CUDA events are recorded on the current stream instead and read once
the batch's results have been copied back, which waits for that stream anyway. On the CPU the
host clock is the device clock.
"""
from __future__ import annotations

import time

import torch


class Stopwatch:
    """Marks on the current stream of ``device``; ``elapsed_ms(a, b)`` once the work before ``b`` is done."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> int:
        """Mark this point of the stream's work; return the mark's number."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def elapsed_ms(self, start: int, end: int) -> float:
        """Milliseconds between two marks (on a GPU this waits for the second, if it has not run yet)."""
        if self.cuda:
            self.marks[end].synchronize()
            return self.marks[start].elapsed_time(self.marks[end])
        return (self.marks[end] - self.marks[start]) * 1000
