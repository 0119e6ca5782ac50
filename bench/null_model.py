"""A model that costs (almost) nothing, for measuring the service around it (bench and tests only).

One pooling layer (the 7x7 GradCAM layer) and a linear head over 1000 classes: the forward pass
takes microseconds, so whatever a run spends is the service's own cost per image.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

NAME = "null"


class NullNetwork(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.AdaptiveAvgPool2d(7)
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(card) -> nn.Module:
    return NullNetwork(card.num_classes)


def write_card(directory: Path) -> Path:
    """Write the null card and its weights into ``directory``; return the card's path."""
    torch.manual_seed(0)
    (directory / "weights").mkdir(parents=True, exist_ok=True)
    torch.save(NullNetwork().state_dict(), directory / "weights" / f"{NAME}.pth")
    card = directory / f"{NAME}.toml"
    card.write_text(f'''
name = "{NAME}"
version = "bench-1"
description = "bench only: one pooling layer and a linear head; measures everything but the model"
architecture = "python"
variant = "bench.null_model:build"
num_classes = 1000
labels = "torchvision:imagenet"

[weights]
path = "weights/{NAME}.pth"

[preprocess]
resize = 256
input_size = 224
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[gradcam]
target_layer = "features"
''')
    return card
