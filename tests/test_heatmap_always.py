"""A done job's heatmap link answers while the job lives (web/heatmaps.py). The cache server (CACHE_URL)
may lose the picture a heatmap is drawn on: `make run`'s cache restarts empty while the main server's
copy of the result answers the next upload, and an evicting cache may drop a picture before its
result. An upload answered from the cache brings the picture's bytes back; with no picture at all the
heatmap is drawn alone at the image's aspect ratio (``X-Heatmap-Base: none``) rather than refused.
Real main and cache redis-servers, a real worker, the real app."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import redis
from PIL import Image

from shared.overlay import keeps_original
from tests import images
from tests.conftest import ARTIFACTS, wait_done
from tools.stack import start_redis, start_worker, stop
from web import create_app


@pytest.fixture(scope="module")
def split(tmp_path_factory, settings):
    """The app and a worker on two servers, main and cache; the cache's client."""
    main_proc, main_url = start_redis(tmp_path_factory.mktemp("heatmap-main"))
    cache_proc, cache_url = start_redis(tmp_path_factory.mktemp("heatmap-cache"))
    own = dataclasses.replace(settings, redis_url=main_url, cache_url=cache_url, worker_concurrency=1)
    ARTIFACTS.mkdir(exist_ok=True)
    worker = start_worker(own, ARTIFACTS / "worker-heatmap.log", name="heatmap")
    yield create_app(own).test_client(), redis.Redis.from_url(cache_url)
    stop(worker)
    stop(main_proc)
    stop(cache_proc)


def submit(client, data: bytes):
    """POST an image as a raw body (the test client spools a big multipart body to a file it leaves open)."""
    return client.post("/api/v1/jobs", data=data, content_type="image/png" if data.startswith(b"\x89PNG") else "image/jpeg")


def _png(answer) -> np.ndarray:
    assert answer.status_code == 200 and answer.mimetype == "image/png", answer.data[:300]
    return np.asarray(Image.open(io.BytesIO(answer.data)).convert("RGB"), dtype=np.int16)


def _suffix(job: dict) -> str:
    cam = job["result"]["gradcam"]
    return f"{job['model']['name']}:{job['model']['version']}:{job['image']['sha256']}:k5-g1" if cam else ""


UPLOADS = {
    "small-jpeg": images.chelsea_jpeg(),  # kept whole as its picture
    "big-jpeg": images.encode(images.chelsea().resize((2400, 1600)), "JPEG", quality=97),  # a thumbnail
    "png": images.encode(images.coffee().resize((300, 200)), "PNG"),
}


def test_an_upload_answered_from_an_emptied_cache_gets_its_heatmap_on_its_picture(split):
    client, cache = split
    assert keeps_original(len(UPLOADS["small-jpeg"])) and not keeps_original(len(UPLOADS["big-jpeg"]))
    first = {name: wait_done(client, submit(client, data).get_json()["id"]) for name, data in UPLOADS.items()}
    drawn = {name: _png(client.get(job["result"]["gradcam"]["url"])) for name, job in first.items()}

    cache.flushall()  # make run restarted: the cache server starts empty; the main server's copy answers
    for name, data in UPLOADS.items():
        again = submit(client, data)
        job = again.get_json()
        assert again.status_code == 200 and job["cached"] and job["status"] == "done", name
        heatmap = client.get(job["result"]["gradcam"]["url"])
        assert "X-Heatmap-Base" not in heatmap.headers, name
        pixels = _png(heatmap)
        assert pixels.shape == drawn[name].shape, name  # the picture is back: the same heatmap as before
        assert np.abs(pixels - drawn[name]).mean() < 1.0, name
        assert client.get(first[name]["result"]["gradcam"]["url"]).status_code == 200  # the old job too
    assert cache.get(f"picture:{_suffix(first['small-jpeg'])}") == UPLOADS["small-jpeg"]


def test_a_done_job_whose_picture_is_gone_has_its_heatmap_drawn_alone(split):
    client, cache = split
    upright = images.exif_rotated_jpeg(images.coffee().resize((300, 150)), 6)  # stored 150 x 300, upright 300 x 150
    job = wait_done(client, submit(client, upright).get_json()["id"])
    assert (job["image"]["width"], job["image"]["height"]) == (300, 150)
    suffix = _suffix(job)
    assert cache.delete(f"picture:{suffix}") == 1  # evicted before its result; no heatmap drawn yet
    heatmap = client.get(job["result"]["gradcam"]["url"])
    assert heatmap.headers["X-Heatmap-Base"] == "none"
    assert "immutable" not in heatmap.headers["Cache-Control"]  # a later upload may bring the picture back
    pixels = _png(heatmap)
    height, width = pixels.shape[:2]
    assert abs(width / height - 2.0) < 0.03  # the upright image's aspect ratio
    left, top, right, bottom = job["result"]["gradcam"]["crop_box"]
    inside = pixels[int(top * height) + 2:int(bottom * height) - 2, int(left * width) + 2:int(right * width) - 2]
    assert inside.std() > 10  # the heatmap's colours, over nothing
    assert not cache.exists(f"overlay:{suffix}")  # not cached: the picture may come back

    submit(client, upright)  # the user uploads it again: the picture is kept again
    again = client.get(job["result"]["gradcam"]["url"])
    assert "X-Heatmap-Base" not in again.headers and _png(again).shape == pixels.shape
