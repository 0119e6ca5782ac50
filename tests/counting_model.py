"""A test-only network, served through a `python` card, that counts the images it computes.

Each forward pass appends one line per real image (not the all-zero warm-up batch) to the file named
by COUNTING_MODEL_LOG, so a test in another process reads how many images the worker computed; each
pass also takes PASS_S, so a long batch is still running when a test acts on it.
"""
import os
import time

import torch
from torch import nn

PASS_S = 0.2


class Counting(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = int(x.flatten(1).any(dim=1).sum())
        if real:
            with open(os.environ["COUNTING_MODEL_LOG"], "a") as log:
                log.write("image\n" * real)
            time.sleep(PASS_S)
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(card) -> nn.Module:
    return Counting(card.num_classes)


def computed(path) -> int:
    """How many images the model has computed so far (every worker process together)."""
    try:
        with open(path) as log:
            return sum(1 for _ in log)
    except FileNotFoundError:
        return 0
