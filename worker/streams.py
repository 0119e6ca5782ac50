"""CUDA streams of a pool child: the stage thread's own stream, and handing its batch to the compute stream.

Each thread that touches the device has its own stream; no two threads ever share one. The stage
thread decodes (nvJPEG) and preprocesses on its stream while the task thread's forward pass runs
on the thread's default stream. nvJPEG writes its outputs from a pool stream of its own without
waiting for the caller's stream, so the caching allocator must not hand it a block that queued
kernels still read (pytorch/vision#9606): the stage stream is synchronised before every decode
call, and blocks freed by the compute stream are never reused on the stage stream (the allocator
keeps a pool per stream; ``record_stream`` holds a handed-over tensor's block until the compute
stream is done with it). A batch crosses with an event: the compute stream waits for it on the
device, the host never blocks.

On the CPU every function here is a no-op, so the same code runs in the tests.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch


def new_stream(device: torch.device) -> "torch.cuda.Stream | None":
    """A stream of its own for one thread's device work (None on the CPU)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def on_stream(stream: "torch.cuda.Stream | None"):
    """Make ``stream`` the calling thread's current stream for the block (nothing on the CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def settle(stream: "torch.cuda.Stream | None") -> None:
    """Wait until everything queued on ``stream`` has run: before a decoder that ignores the stream."""
    if stream is not None:
        stream.synchronize()


def mark_ready(stream: "torch.cuda.Stream | None") -> "torch.cuda.Event | None":
    """An event recorded on ``stream`` now: what another stream waits for before reading its work."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


@dataclasses.dataclass
class DeviceInput:
    """A batch made on another thread's stream, with the event that says it is complete."""

    tensor: torch.Tensor
    ready: "torch.cuda.Event | None" = None

    def take(self) -> torch.Tensor:
        """The tensor, safe to read on the calling thread's current stream (waits on the device only)."""
        if self.ready is not None:
            current = torch.cuda.current_stream(self.tensor.device)
            current.wait_event(self.ready)
            self.tensor.record_stream(current)  # its block is not reused until this stream is done
            self.ready = None
        return self.tensor

    def rows(self, start: int, stop: int) -> "DeviceInput":
        """Rows ``start:stop``, already on the calling thread's stream."""
        return DeviceInput(self.take()[start:stop])
