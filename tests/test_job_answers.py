"""A job's answer is its own for the job's whole life (issue 20, item 5): a job answered from the cache
keeps what it answered when the cached result expires and when the same work is computed again.
One Redis (the default layout), a real worker, the real app."""
import dataclasses

import pytest

from shared.keys import Computation, OutputOptions, image_digest
from tests import images
from tests.conftest import ARTIFACTS, submit, wait_done
from tools import stack

pytestmark = pytest.mark.integration
MODEL = "tiny-resnet18"


@pytest.fixture
def own_stack(tmp_path, settings):
    from web import create_app

    ARTIFACTS.mkdir(exist_ok=True)
    redis_proc, url = stack.start_redis(tmp_path)
    own = dataclasses.replace(settings, redis_url=url, models=(MODEL,), default_model=MODEL, worker_concurrency=1)
    worker = stack.start_worker(own, ARTIFACTS / "answers-worker.log", name="answers")
    yield create_app(own)
    stack.stop(worker)
    stack.stop(redis_proc)


def _expire(client, comp: Computation) -> None:
    """What RESULT_TTL_S (or an admin's cache purge) does to a result and everything kept with it."""
    client.delete(comp.result_key, comp.picture_key, comp.overlay_key, comp.meta_key)


def test_a_cache_hit_keeps_its_answer_when_the_result_expires_and_is_computed_again(own_stack):
    app = own_stack
    client, svc = app.test_client(), app.extensions["imgsvc"]
    upload = images.noise_png(seed=83_000)
    comp = Computation(MODEL, "test-1", image_digest(upload), OutputOptions())
    computed = wait_done(client, submit(client, upload).get_json()["id"], timeout=60)
    hit = submit(client, upload)
    assert hit.status_code == 200 and hit.get_json()["cached"] is True
    answered = hit.get_json()
    _expire(svc.redis, comp)
    assert client.get(f"/api/v1/jobs/{answered['id']}").get_json() == answered
    assert client.get(f"/api/v1/jobs/{computed['id']}").get_json() == computed
    again = wait_done(client, submit(client, upload).get_json()["id"], timeout=60)  # computed a second time
    assert again["status"] == "done" and again["result"]["timings_ms"] != answered["result"]["timings_ms"]
    assert client.get(f"/api/v1/jobs/{answered['id']}").get_json() == answered
    assert client.get(f"/api/v1/jobs/{computed['id']}").get_json() == computed
