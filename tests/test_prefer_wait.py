"""``Prefer: wait=N`` on a submit (issue 21, item 5): one request for a caller that wants the answer now.

Against the real stack: the session worker for a job that settles within N, and a worker of its own
serving the slow test card (tests/slow_model.py) for one that does not.
"""
import dataclasses
import shutil
import time

import pytest
from PIL import Image

from tests import images
from tests.conftest import ARTIFACTS, WORKER_CHILDREN, write_card
from tests.test_integrators import post_job
from tools import stack

pytestmark = pytest.mark.integration
SLOW = "slow"


@pytest.fixture(scope="module")
def slow_app(settings, cards_dir, worker, tmp_path_factory):
    """The app with the slow card added, and a one-child worker that serves only that card."""
    from tests.slow_model import Slow
    from web import create_app

    cards = tmp_path_factory.mktemp("slow-cards") / "cards"
    shutil.copytree(cards_dir, cards)
    write_card(cards, Slow(10), name=SLOW, description="test-only: a known time per forward pass",
               architecture="python", variant="tests.slow_model:build", resize=64, input_size=64, layer="features")
    with_slow = dataclasses.replace(settings, model_cards_dir=cards)
    proc = stack.start_worker(dataclasses.replace(with_slow, models=(SLOW,), default_model=SLOW, worker_concurrency=1),
                              ARTIFACTS / "slow-worker.log", name="slow", ready_children=WORKER_CHILDREN + 1)
    yield create_app(with_slow)
    stack.stop(proc)


def test_a_job_settled_within_the_wait_is_answered_200_done(worker, client):
    started = time.monotonic()
    answer = post_job(client, images.noise_png(seed=21_501), headers={"Prefer": "wait=20"})
    job = answer.get_json()
    assert (answer.status_code, job["status"]) == (200, "done"), job
    assert job["result"]["predictions"] and answer.headers["Preference-Applied"] == "wait=20"
    assert answer.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert time.monotonic() - started < 20


def test_a_cache_hit_with_a_wait_is_answered_at_once(worker, client):
    image = images.noise_png(seed=21_502)
    assert post_job(client, image, headers={"Prefer": "wait=20"}).status_code == 200
    started = time.monotonic()
    hit = post_job(client, image, headers={"Prefer": "respond-async, wait=20"})
    assert (hit.status_code, hit.get_json()["cached"]) == (200, True)
    assert time.monotonic() - started < 1


def test_a_slow_job_is_answered_202_after_the_wait(slow_app):
    from tests.slow_model import SLOW_S

    client = slow_app.test_client()
    bright = images.encode(Image.new("RGB", (64, 48), (250, 250, 250)), "PNG")  # SLOW_S per forward pass
    started = time.monotonic()
    answer = post_job(client, bright, headers={"Prefer": "wait=2"}, model=SLOW)
    waited = time.monotonic() - started
    job = answer.get_json()
    assert (answer.status_code, answer.headers["Preference-Applied"]) == (202, "wait=2")
    assert job["status"] in ("queued", "running") and 2 <= waited < SLOW_S, waited
    assert client.get(f"/api/v1/jobs/{job['id']}?wait=20").get_json()["status"] == "done"


@pytest.mark.parametrize("prefer", ["wait=0", "wait=soon", "respond-async", "handling=lenient"])
def test_a_wait_preference_that_asks_for_nothing_is_ignored(worker, client, prefer):
    answer = post_job(client, images.noise_png(seed=21_510 + len(prefer)), headers={"Prefer": prefer})
    assert answer.status_code == 202 and "Preference-Applied" not in answer.headers


def test_a_long_wait_is_held_to_the_long_poll_bound(worker, client):
    answer = post_job(client, images.noise_png(seed=21_520), headers={"Prefer": "wait=3600"})
    assert answer.headers["Preference-Applied"] == "wait=30"


def test_a_wait_past_max_waiters_is_answered_at_once(settings, worker):
    from web import create_app

    app = create_app(dataclasses.replace(settings, max_waiters=0))
    answer = post_job(app.test_client(), images.noise_png(seed=21_530), headers={"Prefer": "wait=20"})
    assert answer.status_code == 202 and "Preference-Applied" not in answer.headers
    assert answer.headers["Wait-Skipped"] == "too-many-waiters"


def test_a_held_submit_is_answered_at_once_when_its_job_is_canceled(slow_app):
    """A submit holding `Prefer: wait=20` for a job that computes for SLOW_S: the job's owner cancels
    it meanwhile (the same anonymous client), and the held request answers the canceled job right
    away, not at the end of its wait or of the computation."""
    import threading

    from shared.keys import Computation, OutputOptions, image_digest
    from tests.slow_model import SLOW_S

    client = slow_app.test_client()
    bright = images.encode(Image.new("RGB", (64, 48), (251, 251, 251)), "PNG")
    held: dict = {}

    def hold() -> None:
        started = time.monotonic()
        held["answer"] = post_job(client, bright, headers={"Prefer": "wait=20"}, model=SLOW)
        held["waited"] = time.monotonic() - started

    holder = threading.Thread(target=hold)
    holder.start()
    store = slow_app.extensions["imgsvc"].store
    [card] = [m for m in client.get("/api/v1/models").get_json()["models"] if m["name"] == SLOW]
    attached = Computation(SLOW, card["version"], image_digest(bright), OutputOptions()).attached_key
    job_id = stack.wait_for(lambda: store.redis.lindex(attached, 0), 10, "the held job to be accepted",
                            interval=0.02).decode()
    time.sleep(0.3)  # the submit is holding its answer by now
    canceled_at = time.monotonic()
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    holder.join(20)
    answer = held["answer"]
    assert (answer.status_code, answer.get_json()["status"]) == (200, "canceled"), answer.get_json()
    assert held["waited"] < SLOW_S and time.monotonic() - canceled_at < 2, held["waited"]
