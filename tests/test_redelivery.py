"""One crash, one redelivery, one attempt (issue 20, item 3): a dead child's message goes back once,
copies of one computation's message in one batch count one attempt, and a copy claimed after the
computation ended counts none. Each on a Redis of its own, with a real worker where one takes part."""
import dataclasses

import pytest

from shared.jobs import Claim
from shared.keys import Computation, OutputOptions, image_digest
from shared.tasks import inference_queue, send_inference
from tests import images
from tests.conftest import ARTIFACTS, submit, wait_done
from tools import stack
from worker.broker import BatchReceiver
from worker.sweeper import LOCK_KEY, Sweeper

pytestmark = pytest.mark.integration
MODEL = "tiny-resnet18"
DEAD_CHILD = "deadhost:4242"  # no heartbeat in `workers`


@pytest.fixture
def own_stack(tmp_path, settings):
    """A Redis of this test's own and the web app; MAX_ATTEMPTS=2, so a second attempt too many fails."""
    from web import create_app

    ARTIFACTS.mkdir(exist_ok=True)
    redis_proc, url = stack.start_redis(tmp_path)
    own = dataclasses.replace(settings, redis_url=url, models=(MODEL,), default_model=MODEL, worker_concurrency=1,
                              max_attempts=2)
    app = create_app(own)
    yield own, app, app.extensions["imgsvc"]
    stack.stop(redis_proc)


def _computation(upload: bytes) -> Computation:
    return Computation(MODEL, "test-1", image_digest(upload), OutputOptions())


def _drain(settings, app, job_ids: list[str], name: str) -> list[dict]:
    """Start a worker, wait until the jobs settle and every message is taken and acknowledged."""
    client, svc = app.test_client(), app.extensions["imgsvc"]
    worker = stack.start_worker(settings, ARTIFACTS / f"{name}-worker.log", name=name)
    try:
        jobs = [wait_done(client, job_id, timeout=60) for job_id in job_ids]
        stack.wait_for(lambda: not svc.redis.llen(inference_queue(MODEL)) and not svc.redis.hlen("unacked"), 60,
                       "every message to be taken and acknowledged")
    finally:
        stack.stop(worker)
    return jobs


def test_a_dead_childs_message_goes_back_once_and_counts_one_attempt(own_stack):
    settings, app, svc = own_stack
    upload = images.noise_png(seed=82_000)
    job = submit(app.test_client(), upload).get_json()
    comp, queue = _computation(upload), inference_queue(MODEL)
    with svc.celery.connection_for_read() as connection:  # a child takes it into a batch, claims it, dies
        taker = BatchReceiver.for_connection(connection, owner=DEAD_CHILD)
        assert [p.comp for p in taker.take(queue, 4)] == [comp]
        assert svc.store.claim([comp], owner=DEAD_CHILD)[0].attempt == 1
        taker.close()
    svc.redis.delete(LOCK_KEY)
    counts = Sweeper(settings, svc.redis, svc.celery, name="test", queues=(queue,)).sweep()
    assert (counts["restored"], counts["orphaned"]) == (1, 1)
    assert svc.redis.llen(queue) == 1  # its message, back at the head: no second copy beside it
    [done] = _drain(settings, app, [job["id"]], "redelivery")
    assert done["status"] == "done"
    assert svc.store.computations()[f"redelivered:{MODEL}"] == 1
    assert not svc.redis.exists(comp.attempts_key)


def test_copies_of_one_message_in_one_batch_are_one_attempt(own_stack):
    settings, app, svc = own_stack
    upload = images.noise_png(seed=82_100)
    job = submit(app.test_client(), upload).get_json()
    comp = _computation(upload)
    for _ in range(2):  # e.g. a copy restored late beside the one sent again: three in the queue
        send_inference(svc.celery, comp)
    [done] = _drain(settings, app, [job["id"]], "copies")  # taken into one batch: MAX_BATCH is 4
    assert done["status"] == "done", done["error"]
    assert f"redelivered:{MODEL}" not in svc.store.computations()
    assert not svc.redis.exists(comp.attempts_key)


def test_copies_claimed_together_are_claimed_once(own_stack):
    _, app, svc = own_stack
    upload = images.noise_png(seed=82_200)
    submit(app.test_client(), upload)
    comp = _computation(upload)
    assert svc.store.claim([comp, comp]) == [Claim(False, upload, 1), Claim(True, None, 1)]  # the first computes


def test_a_copy_claimed_after_the_computation_ended_counts_no_attempt(own_stack):
    _, app, svc = own_stack
    upload = images.noise_png(seed=82_300)
    job = submit(app.test_client(), upload).get_json()
    comp = _computation(upload)
    assert svc.store.claim([comp])[0].attempt == 1
    svc.store.finish(comp, {"predictions": [], "gradcam": None})
    assert svc.store.claim([comp]) == [Claim(True, None, 0)]  # a late copy: nothing to do, nothing counted
    assert not svc.redis.exists(comp.attempts_key, comp.owner_key)
    assert svc.store.get(job["id"])["status"] == "done"
    svc.redis.delete(comp.result_key)  # the result expired (or was purged): the same image is new work again
    assert submit(app.test_client(), upload).status_code == 202
    assert svc.store.claim([comp])[0].attempt == 1  # its first delivery, not a retry
