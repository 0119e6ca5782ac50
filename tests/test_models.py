"""Cards turn into networks without code changes; broken cards fail with a clear reason."""
import pytest
import torch

from shared.cards import CardError, ModelCatalog, load_card
from shared.errors import UnknownModel
from tests import images
from tests.conftest import TINY_LABELS
from worker.imaging import preprocess
from worker.inference import predict, top_predictions
from worker.models import load_model


def test_local_checkpoint_card_serves(cards_dir):
    card = load_card(cards_dir / "tiny-resnet18.toml")
    model = load_model(card, torch.device("cpu"))
    prepared = preprocess(images.chelsea(), card)
    output = predict(model, [prepared.tensor], gradcam=True)
    predictions = top_predictions(output.probabilities[0], model.labels, 3)
    assert [p["label"] in TINY_LABELS for p in predictions] == [True] * 3
    assert tuple(output.cams.shape) == (1, 4, 4)  # layer4 of resnet18 on a 128 px input


def test_catalog_lists_cards_and_refuses_unknown_names(cards_dir):
    catalog = ModelCatalog.load(cards_dir, (), "efficientnet-lite0")
    assert sorted(card.name for card in catalog) == ["efficientnet-lite0", "misbehaving", "tiny-resnet18"]
    assert catalog.get(None).name == "efficientnet-lite0"
    with pytest.raises(UnknownModel, match="served models"):
        catalog.get("nope")


def _broken(tmp_path, cards_dir, old: str, new: str):
    text = (cards_dir / "tiny-resnet18.toml").read_text().replace(old, new)
    text = text.replace('path = "weights/', f'path = "{cards_dir}/weights/')
    path = tmp_path / "broken.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("old, new, message", [
    ('architecture = "torchvision"', 'architecture = "caffe"', "unknown architecture"),
    ('target_layer = "layer4"', 'target_layer = "layer9"', "not a submodule"),
    ('path = "weights/tiny-resnet18.pth"', 'path = "weights/missing.pth"', "does not exist"),
])
def test_broken_cards_say_what_is_wrong(tmp_path, cards_dir, old, new, message):
    card = load_card(_broken(tmp_path, cards_dir, old, new))
    with pytest.raises(CardError, match=message):
        load_model(card, torch.device("cpu"))


def test_card_missing_a_field_is_refused(tmp_path, cards_dir):
    with pytest.raises(CardError, match="missing field 'version'"):
        load_card(_broken(tmp_path, cards_dir, 'version = "test-1"', ""))
