"""A test-only network, served through a `python` card, that misbehaves on marker inputs.

An all-white image kills the worker process that runs it (a poison pill); an all-black image
never finishes (until the soft time limit stops it); an all-red one ignores the soft limit too (until
the hard limit kills its process); an all-green one fails as a broken GPU does (the CUDA error an illegal
memory access raises, which leaves the device unusable for the process). Anything else is
classified normally.
"""
import os
import signal
import time

import torch
from torch import nn

WHITE_FLOOR = 2.0  # every channel of a white pixel normalises above this with ImageNet mean/std
BLACK_CEILING = -1.5  # and every channel of a black pixel below this


def _sleep_through_anything(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(1)
        except BaseException:  # noqa: BLE001 - swallows the soft time limit on purpose
            continue


class Misbehaving(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.amin(dim=(1, 2, 3)) > WHITE_FLOOR).any()):
            os.kill(os.getpid(), signal.SIGKILL)
        if bool((x.amax(dim=(1, 2, 3)) < BLACK_CEILING).any()):
            time.sleep(600)
        if bool(((x[:, 0].amin(dim=(1, 2)) > WHITE_FLOOR) & (x[:, 1].amax(dim=(1, 2)) < BLACK_CEILING)).any()):
            _sleep_through_anything(600)
        if bool(((x[:, 1].amin(dim=(1, 2)) > WHITE_FLOOR) & (x[:, 0].amax(dim=(1, 2)) < BLACK_CEILING)).any()):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(card) -> nn.Module:
    return Misbehaving(card.num_classes)
