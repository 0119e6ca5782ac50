"""A test-only network, served through a `python` card, that takes a known time per forward pass.

Bright images (mean above BRIGHT_MEAN after ImageNet normalisation) take SLOW_S; any other image
FAST_S; the all-zero warm-up batch none. Admin tests use it to hold a job in flight while they act.
"""
import time

import torch
from torch import nn

BRIGHT_MEAN = 1.5
SLOW_S = 6.0
FAST_S = 0.3


class Slow(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.any()):
            time.sleep(SLOW_S if bool((x.mean(dim=(1, 2, 3)) > BRIGHT_MEAN).any()) else FAST_S)
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(card) -> nn.Module:
    return Slow(card.num_classes)
