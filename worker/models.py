"""Turn a model card into a network on a device, with its labels and GradCAM layer.

Each architecture is one builder; a card names the builder, so adding a model is adding a card.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import logging
import threading
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from shared.cards import CardError, ModelCard

log = logging.getLogger(__name__)

_loads = 0
_loads_lock = threading.Lock()


def load_count() -> int:
    """Return how many models this process has built (one per served card per child)."""
    return _loads


def _efficientnet_lite(card: ModelCard) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(card.variant, num_classes=card.num_classes)


def _torchvision(card: ModelCard) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(card.variant, weights=None, num_classes=card.num_classes)


def _python(card: ModelCard) -> nn.Module:
    """Any network: ``variant = "package.module:factory"``, where ``factory(card)`` returns it."""
    module_name, _, factory = card.variant.partition(":")
    if not factory:
        raise CardError(f"{card.name}: a python architecture's variant is 'module:factory'")
    return getattr(importlib.import_module(module_name), factory)(card)


BUILDERS: dict[str, Callable[[ModelCard], nn.Module]] = {
    "efficientnet-lite-pytorch": _efficientnet_lite,
    "torchvision": _torchvision,
    "python": _python,
}


def weights_path(card: ModelCard) -> Path:
    """Return the local file holding the card's weights (never a download)."""
    if "path" in card.weights:
        path = card.resolve(card.weights["path"])
    else:
        resource = card.weights.get("resource")
        if not resource:
            raise CardError(f"{card.name}: [weights] package needs a 'resource' inside it")
        path = Path(str(importlib.resources.files(card.weights["package"]).joinpath(resource)))
    if not path.is_file():
        raise CardError(f"{card.name}: weights file {path} does not exist")
    return path


def load_labels(card: ModelCard) -> tuple[str, ...]:
    """Return the class names the card names."""
    if isinstance(card.labels, tuple):
        return card.labels
    if card.labels == "torchvision:imagenet":
        from torchvision.models import ResNet18_Weights

        labels = tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    elif card.labels.startswith("file:"):
        labels = tuple(line.strip() for line in card.resolve(card.labels[5:]).read_text().splitlines()
                       if line.strip())
    else:
        raise CardError(f"{card.name}: labels must be 'torchvision:imagenet', 'file:<path>' or a list")
    if len(labels) != card.num_classes:
        raise CardError(f"{card.name}: {len(labels)} labels for {card.num_classes} classes")
    return labels


@dataclasses.dataclass
class LoadedModel:
    """A card's network, resident on one device, ready for inference and GradCAM."""

    card: ModelCard
    network: nn.Module
    labels: tuple[str, ...]
    device: torch.device
    target_layer: nn.Module


def load_model(card: ModelCard, device: torch.device) -> LoadedModel:
    """Build the card's architecture, load its weights, move it to ``device`` and freeze it."""
    global _loads
    try:
        builder = BUILDERS[card.architecture]
    except KeyError:
        raise CardError(f"{card.name}: unknown architecture {card.architecture!r}; "
                        f"known: {', '.join(sorted(BUILDERS))}") from None
    network = builder(card)
    state = torch.load(weights_path(card), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    network.load_state_dict(state)
    # Parameters never need gradients: GradCAM differentiates only w.r.t. the target activation.
    network.requires_grad_(False)
    network.eval()
    network.to(device=device, memory_format=torch.channels_last)
    try:
        target = network.get_submodule(card.gradcam_layer)
    except AttributeError:
        raise CardError(f"{card.name}: gradcam.target_layer {card.gradcam_layer!r} "
                        f"is not a submodule of {card.variant}") from None
    with _loads_lock:
        _loads += 1
    log.info("loaded model %s %s on %s", card.name, card.version, device)
    return LoadedModel(card, network, load_labels(card), device, target)
