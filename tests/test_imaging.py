"""Decoding and preprocessing in the worker: odd modes, EXIF, reduced-scale JPEG decode."""
import numpy as np
import pytest
from PIL import Image

from shared.cards import load_card
from shared.errors import DecodeFailed
from shared.settings import REPO_ROOT
from tests import images
from worker.imaging import decode, preprocess

CARD = load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml")


@pytest.mark.parametrize("name", sorted(images.odd_valid_images()))
def test_every_odd_image_decodes_to_rgb(name):
    decoded = decode(images.odd_valid_images()[name], min_short_side=256, max_pixels=10**8)
    assert decoded.image.mode == "RGB"
    prepared = preprocess(decoded.image, CARD)
    assert tuple(prepared.tensor.shape) == (3, 224, 224)
    assert np.isfinite(prepared.tensor.numpy()).all()


def test_exif_orientation_is_applied():
    cat = images.chelsea()
    decoded = decode(images.exif_rotated_jpeg(cat), min_short_side=256, max_pixels=10**8)
    assert decoded.image.size == cat.size
    upright = np.asarray(cat, dtype=np.float32)
    assert np.abs(np.asarray(decoded.image, dtype=np.float32) - upright).mean() < 8


def test_16bit_png_keeps_its_contrast():
    decoded = decode(images.png16(), min_short_side=256, max_pixels=10**8)
    gray = np.asarray(decoded.image)[..., 0]
    assert gray.std() > 20  # not clipped to white


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    decoded = decode(images.encode(clear, "PNG"), min_short_side=256, max_pixels=10**8)
    assert np.asarray(decoded.image).min() == 255


def test_big_jpeg_decodes_at_reduced_scale():
    big = images.chelsea().resize((4000, 3000))
    decoded = decode(images.encode(big, "JPEG", quality=85), min_short_side=256, max_pixels=10**8)
    width, height = decoded.image.size
    assert min(width, height) >= 256
    assert width <= 1000  # draft() reduced the 4000 px decode by a factor of 4 or more


def test_corrupt_pixel_data_fails_cleanly():
    with pytest.raises(DecodeFailed):
        decode(images.png_with_corrupt_pixels(), min_short_side=256, max_pixels=10**8)


def test_crop_box_is_centred():
    prepared = preprocess(Image.new("RGB", (512, 256)), CARD)
    left, top, right, bottom = prepared.crop_box
    assert (top, bottom) == (pytest.approx(16 / 256), pytest.approx(240 / 256))
    assert left == pytest.approx(1 - right)
