"""Load: 500 concurrent uploads (new images and repeats) against gunicorn: no errors but deliberate
503s, every accepted job done, memory of web and worker bounded."""
import concurrent.futures

import pytest
import requests

from tests import images
from tools import stack

pytestmark = pytest.mark.integration
UPLOADS, CLIENTS = 500, 32


@pytest.fixture(scope="module")
def web(settings, worker):
    proc, url = stack.start_web(settings, threads=16)
    yield proc, url
    stack.stop(proc)


def test_500_concurrent_uploads(web, worker, redis_client):
    proc, url = web
    fresh = [images.noise_png(seed=40_000 + i, size=(48, 32)) for i in range(300)]
    repeats = [images.noise_png(seed=40_000 + i % 20, size=(48, 32)) for i in range(200)]
    uploads = [data for pair in zip(fresh, repeats + [None] * 100) for data in pair if data is not None]
    assert len(uploads) == UPLOADS
    rss_before = {"web": stack.rss_mb(proc.pid), "worker": stack.rss_mb(worker.pid)}

    def post(data):
        with requests.post(f"{url}/api/v1/jobs", files={"image": ("x.png", data)}, timeout=60) as answer:
            return answer.status_code, answer.json()

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(post, uploads))
    codes = [code for code, _ in answers]
    assert set(codes) <= {200, 202, 503}, sorted(set(codes))
    accepted = [body["id"] for code, body in answers if code in (200, 202)]

    with requests.Session() as session:
        for job_id in accepted:
            job = session.get(f"{url}/api/v1/jobs/{job_id}?wait=30", timeout=60).json()
            while job["status"] in ("queued", "running"):
                job = session.get(f"{url}/api/v1/jobs/{job_id}?wait=30", timeout=60).json()
            assert job["status"] == "done", job
    rss_after = {"web": stack.rss_mb(proc.pid), "worker": stack.rss_mb(worker.pid)}
    print(f"\nload: {codes.count(202)} accepted, {codes.count(200)} cache hits, {codes.count(503)} refused; "
          f"RSS MiB before {rss_before}, after {rss_after}")
    assert rss_after["web"] < rss_before["web"] + 150
    assert rss_after["worker"] < rss_before["worker"] * 1.5 + 200
