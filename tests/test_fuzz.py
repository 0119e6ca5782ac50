"""Fuzz the upload checks and the worker's decode: any bytes get an answer, never a crash."""
import io

from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from shared.cards import load_card
from shared.errors import DecodeFailed, ServiceError
from shared.settings import REPO_ROOT
from tests import images
from web.upload import inspect_image
from worker.imaging import decode, preprocess

CARD = load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml")
SEEDS = [images.encode(Image.new("RGB", (24, 16), (90, 20, 200)), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP")]
LIMITS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated_images(draw):
    """A small valid image with some bytes flipped, cut or inserted: close to valid, so deep paths run."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:position + draw(st.integers(1, 64))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            break
    return bytes(data)


def _check_then_decode(data: bytes) -> None:
    try:
        inspect_image(data, max_pixels=4_000_000)
    except ServiceError as exc:
        assert 400 <= exc.status < 500
        return
    try:
        preprocess(decode(data, min_short_side=256, max_pixels=4_000_000).image, CARD)
    except DecodeFailed:
        pass


@LIMITS
@given(mutated_images())
def test_mutated_images_never_raise_unexpected_errors(data):
    _check_then_decode(data)


@LIMITS
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise_unexpected_errors(data):
    _check_then_decode(data)


def test_seeds_are_valid():
    for seed in SEEDS:
        assert Image.open(io.BytesIO(seed)).size == (24, 16)
        _check_then_decode(seed)
