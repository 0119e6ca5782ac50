"""Poison pills and runaway jobs end failed with a clear code; the worker and other jobs carry on."""
import pytest
from PIL import Image

from shared.settings import Settings
from tests import images
from tests.conftest import SOFT_TIME_LIMIT_S, submit, wait_done

pytestmark = pytest.mark.integration


def _plain(colour) -> bytes:
    return images.encode(Image.new("RGB", (80, 60), colour), "PNG")


def test_a_job_that_kills_its_worker_fails_after_max_attempts(worker, client, redis_client):
    poison = submit(client, _plain((255, 255, 255)), model="misbehaving")
    assert poison.status_code == 202
    others = [submit(client, images.noise_png(seed=8000 + i)).get_json()["id"] for i in range(4)]
    for job_id in others:
        assert wait_done(client, job_id)["status"] == "done"  # other jobs keep flowing
    job = wait_done(client, poison.get_json()["id"], timeout=240)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_crashed"
    assert str(Settings().max_attempts) in job["error"]["message"]
    assert worker.poll() is None  # the main process survived; crashed children were replaced
    fine = wait_done(client, submit(client, images.noise_png(seed=8100), model="misbehaving").get_json()["id"])
    assert fine["status"] == "done"


@pytest.mark.parametrize("colour, message, seed", [
    ((0, 0, 0), "longer than", 8200),  # stops at the soft limit; the child lives on
    ((255, 0, 0), "hard time limit", 8300),  # ignores the soft limit; killed and replaced at the hard one
])
def test_a_job_past_its_time_limit_fails_with_timeout(worker, client, colour, message, seed):
    answer = submit(client, _plain(colour), model="misbehaving")
    assert answer.status_code == 202
    job = wait_done(client, answer.get_json()["id"], timeout=SOFT_TIME_LIMIT_S * 8)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"
    assert message in job["error"]["message"]
    assert worker.poll() is None
    follow_up = wait_done(client, submit(client, images.noise_png(seed=seed), model="misbehaving").get_json()["id"])
    assert follow_up["status"] == "done"
