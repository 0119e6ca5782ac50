"""Model cards: TOML files in ``models/`` that say everything needed to serve a model.

Adding a model is adding a card. Both tiers read cards; only the worker turns one into a network.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from shared.errors import UnknownModel


class CardError(ValueError):
    """A model card is missing a field or holds a value we cannot use."""


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """One served model: identity, architecture, weights, labels, preprocessing and GradCAM layer."""

    name: str
    version: str
    architecture: str  # a builder known to worker/models.py, e.g. efficientnet-lite-pytorch, torchvision
    variant: str  # the architecture's own name for the network, e.g. efficientnet-lite0, resnet18
    num_classes: int
    weights: dict  # {"package": ..., "resource": ...} or {"path": ...} (relative to the card)
    labels: str | tuple[str, ...]  # "torchvision:imagenet", "file:<path>" or an inline list
    resize: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    gradcam_layer: str
    description: str = ""
    source: Path | None = None

    def resolve(self, relative: str) -> Path:
        """Resolve a path written in the card relative to the card's own folder."""
        path = Path(relative)
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path

    def public(self) -> dict:
        """Return what ``GET /api/v1/models`` shows of this card."""
        return {
            "name": self.name, "version": self.version, "description": self.description,
            "architecture": self.architecture, "variant": self.variant,
            "num_classes": self.num_classes, "input_size": self.input_size,
            "preprocess": {"resize": self.resize, "crop": self.input_size,
                           "mean": list(self.mean), "std": list(self.std)},
            "gradcam_layer": self.gradcam_layer,
        }


def _triple(value, field: str, where: Path) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise CardError(f"{where}: {field} must be a list of three numbers")
    return tuple(float(v) for v in value)


def load_card(path: Path) -> ModelCard:
    """Parse and check one card file."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CardError(f"{path}: {exc}") from exc
    try:
        pre, cam, weights = raw["preprocess"], raw["gradcam"], raw["weights"]
        labels = raw["labels"]
        card = ModelCard(
            name=str(raw["name"]), version=str(raw["version"]),
            architecture=str(raw["architecture"]), variant=str(raw["variant"]),
            num_classes=int(raw["num_classes"]), weights=dict(weights),
            labels=tuple(labels) if isinstance(labels, list) else str(labels),
            resize=int(pre["resize"]), input_size=int(pre["input_size"]),
            mean=_triple(pre["mean"], "preprocess.mean", path),
            std=_triple(pre["std"], "preprocess.std", path),
            gradcam_layer=str(cam["target_layer"]), description=str(raw.get("description", "")),
            source=path,
        )
    except KeyError as exc:
        raise CardError(f"{path}: missing field {exc.args[0]!r}") from None
    if ":" in card.name or ":" in card.version:
        raise CardError(f"{path}: name and version must not contain ':' (they are parts of Redis keys)")
    if not ({"package", "path"} & card.weights.keys()):
        raise CardError(f"{path}: [weights] needs 'package' (+ 'resource') or 'path'")
    if card.input_size > card.resize:
        raise CardError(f"{path}: preprocess.input_size must not exceed preprocess.resize")
    if isinstance(card.labels, tuple) and len(card.labels) != card.num_classes:
        raise CardError(f"{path}: {len(card.labels)} labels for {card.num_classes} classes")
    return card


class ModelCatalog:
    """The cards this deployment serves, by name."""

    def __init__(self, cards: list[ModelCard], default: str):
        self.cards = {card.name: card for card in cards}
        if not self.cards:
            raise CardError("no model cards to serve")
        self.default = default if default in self.cards else next(iter(self.cards))

    @classmethod
    def load(cls, directory: Path, served: tuple[str, ...], default: str) -> "ModelCatalog":
        """Load every ``*.toml`` card in ``directory``, keeping only ``served`` names if given."""
        cards = [load_card(p) for p in sorted(Path(directory).glob("*.toml"))]
        if served:
            missing = set(served) - {c.name for c in cards}
            if missing:
                raise CardError(f"MODELS names cards not found in {directory}: {sorted(missing)}")
            cards = [c for c in cards if c.name in served]
        return cls(cards, default)

    def get(self, name: str | None) -> ModelCard:
        """Return the named card (the default for None), or raise UnknownModel."""
        name = name or self.default
        try:
            return self.cards[name]
        except KeyError:
            raise UnknownModel(
                f"Unknown model {name!r}; served models: {', '.join(sorted(self.cards))}."
            ) from None

    def __iter__(self):
        return iter(self.cards.values())
