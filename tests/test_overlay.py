"""The heatmap off the inference path: drawn later from the stored map and the kept picture, it is
the overlay the worker used to draw (pixel for pixel from a kept upload, within JPEG loss from a
thumbnail), and the real stack serves it, once rendered, from the cache."""
import io

import numpy as np
import pytest
from PIL import Image

from shared.jobs import KEEP_UPLOAD
from shared.overlay import (ORIGINAL_PICTURE_MAX_BYTES, keeps_original, overlay_thumbnail, render_overlay,
                            render_stored)
from shared.pictures import decode
from tests import images
from tests.conftest import submit, wait_done
from worker.imaging import preprocess
from worker.pipeline import MAP_DECIMALS

RESIZE, MAX_PIXELS = 256, 10**8


class _Card:  # the two preprocessing numbers preprocess() reads, as on the Lite0 card
    resize, input_size, mean, std = 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _stored_map(cam: np.ndarray) -> list[list[float]]:
    """The map as a result stores it (see worker.pipeline.results): 0..1, rounded."""
    cam = cam - cam.min()
    return np.round(cam / cam.max(), MAP_DECIMALS).tolist()


def _pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _eager_and_lazy(upload: bytes, seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    decoded = decode(upload, min_short_side=RESIZE, max_pixels=MAX_PIXELS).image
    crop_box = preprocess(decoded, _Card).crop_box
    cam = np.random.default_rng(seed).random((7, 7)).astype(np.float32)
    eager = render_overlay(decoded, cam, crop_box)  # what the worker drew before the change
    picture = upload if keeps_original(len(upload)) else overlay_thumbnail(decoded)
    lazy = render_stored(picture, _stored_map(cam), list(crop_box), min_short_side=RESIZE, max_pixels=MAX_PIXELS)
    return _pixels(eager), _pixels(lazy), picture


@pytest.mark.parametrize("upload", [images.chelsea_jpeg(), images.exif_rotated_jpeg(images.coffee(), 6),
                                    images.encode(images.coffee().resize((300, 200)), "PNG")], ids=["jpeg", "exif-6", "png"])
def test_an_overlay_drawn_from_the_kept_upload_equals_the_eager_one(upload):
    assert keeps_original(len(upload))
    eager, lazy, _ = _eager_and_lazy(upload, seed=len(upload))
    assert eager.shape == lazy.shape
    # The stored map is rounded to 1e-4: a heatmap level can move by one step of 256 at most.
    difference = np.abs(eager - lazy)
    assert difference.max() <= 4 and difference.mean() < 0.05


def test_a_big_upload_keeps_a_small_thumbnail_that_draws_the_same_overlay():
    rng = np.random.default_rng(11)
    photo = np.asarray(images.chelsea().resize((3000, 2000)), dtype=np.int16)
    noisy = np.clip(photo + rng.integers(-12, 12, photo.shape), 0, 255).astype(np.uint8)
    upload = images.encode(Image.fromarray(noisy), "JPEG", quality=95)
    assert not keeps_original(len(upload))
    eager, lazy, picture = _eager_and_lazy(upload, seed=3)
    assert eager.shape == lazy.shape  # same size and aspect ratio as the eager overlay
    assert len(picture) < ORIGINAL_PICTURE_MAX_BYTES / 2 < len(upload) / 10
    difference = np.abs(eager - lazy)
    assert difference.mean() < 2.0 and np.percentile(difference, 99) <= 16  # JPEG loss only


@pytest.mark.integration
def test_the_stack_stores_the_map_and_renders_the_heatmap_once(worker, client, redis_client):
    upload = images.exif_rotated_jpeg(images.chelsea(), 8)
    job = wait_done(client, submit(client, upload).get_json()["id"])
    cam = job["result"]["gradcam"]
    assert job["status"] == "done" and cam["label"] == job["result"]["predictions"][0]["label"]
    assert cam["class_index"] == job["result"]["predictions"][0]["index"]
    grid = np.asarray(cam["map"])
    assert grid.shape == (7, 7) and grid.min() == 0.0 and grid.max() == 1.0
    left, top, right, bottom = cam["crop_box"]
    assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
    assert job["result"]["timings_ms"]["render"] == 0.0  # nothing drawn on the inference path
    suffix = redis_client.hget(f"job:{job['id']}", "result_key").decode().removeprefix("result:")
    assert redis_client.get(f"picture:{suffix}") == upload and not redis_client.exists(f"overlay:{suffix}")

    first = client.get(cam["url"])
    assert first.status_code == 200 and first.mimetype == "image/png"
    assert redis_client.exists(f"overlay:{suffix}")  # rendered once, then served from the cache
    decoded = decode(upload, min_short_side=RESIZE, max_pixels=MAX_PIXELS).image
    eager = render_overlay(decoded, grid.astype(np.float32), tuple(cam["crop_box"]))
    assert np.abs(_pixels(first.data) - _pixels(eager)).max() <= 4
    assert client.get(cam["url"]).data == first.data


def test_keep_upload_is_not_mistaken_for_picture_bytes():
    assert not isinstance(KEEP_UPLOAD, bytes)  # the job store tells the two apart by type
