"""Our GradCAM agrees with pytorch-grad-cam and never differentiates past the target layer."""
import copy

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from shared.cards import load_card
from shared.settings import REPO_ROOT
from tests import images
from worker.gradcam import forward_with_cam
from worker.imaging import preprocess
from worker.models import load_model
from shared.overlay import normalise

CARD = load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml")


@pytest.fixture(scope="module")
def lite0():
    torch.set_num_threads(2)
    return load_model(CARD, torch.device("cpu"))


def _input(image) -> torch.Tensor:
    return preprocess(image, CARD).tensor[None].contiguous(memory_format=torch.channels_last)


def _reference_cam(lite0, batch, class_index: int) -> np.ndarray:
    network = copy.deepcopy(lite0.network).requires_grad_(True)
    layer = network.get_submodule(CARD.gradcam_layer)
    with GradCAM(model=network, target_layers=[layer]) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(class_index)])[0]


@pytest.mark.parametrize("picture, class_index", [("chelsea", None), ("coffee", None), ("chelsea", 281)])
def test_map_matches_pytorch_grad_cam(lite0, picture, class_index):
    batch = _input(getattr(images, picture)())
    requested = None if class_index is None else torch.tensor([class_index])
    ours = forward_with_cam(lite0.network, lite0.target_layer, batch, requested)
    explained = int(ours.class_index[0])
    reference = _reference_cam(lite0, batch, explained)
    resized = cv2.resize(normalise(ours.cams[0].numpy()), reference.shape[::-1])
    correlation = np.corrcoef(resized.ravel(), reference.ravel())[0, 1]
    assert correlation >= 0.99, correlation
    if class_index is not None:
        assert explained == class_index


def test_gradient_stops_at_the_target_layer(lite0):
    reached = []
    hooks = [lite0.network._conv_stem.register_full_backward_hook(lambda *a: reached.append("stem")),
             lite0.network._blocks[-1].register_full_backward_hook(lambda *a: reached.append("block"))]
    try:
        forward_with_cam(lite0.network, lite0.target_layer, _input(images.chelsea()))
    finally:
        for hook in hooks:
            hook.remove()
    assert reached == []
    assert all(p.grad is None for p in lite0.network.parameters())


def test_batched_maps_equal_single_maps(lite0):
    pictures = [_input(images.chelsea()), _input(images.coffee())]
    batched = forward_with_cam(lite0.network, lite0.target_layer, torch.cat(pictures))
    for i, single in enumerate(pictures):
        alone = forward_with_cam(lite0.network, lite0.target_layer, single)
        assert int(alone.class_index[0]) == int(batched.class_index[i])
        assert torch.allclose(alone.cams[0], batched.cams[i], rtol=1e-3, atol=1e-4)


def test_chelsea_is_a_cat(lite0):
    logits = forward_with_cam(lite0.network, lite0.target_layer, _input(images.chelsea())).logits
    top = lite0.labels[int(logits.argmax())]
    assert top in {"Egyptian cat", "tabby", "tiger cat"}
