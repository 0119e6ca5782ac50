"""queued:bytes, the count MAX_QUEUED_MB bounds, on a Redis of this test's own (issue 20, item 1).

Each computation's upload is counted once, however many times it is submitted, and the sweeper
counts again from the uploads really waiting, so a slip cannot leave the service refusing uploads.
"""
import dataclasses

import pytest

from shared.jobscripts import WAITING_COMPUTATION_BYTES, WAITING_JOB_BYTES
from shared.keys import QUEUED_BYTES_KEY, QUEUED_SIZES_KEY, Computation, OutputOptions, image_digest
from shared.tasks import inference_queue
from tests import images
from tests.conftest import ARTIFACTS, submit, wait_done
from tools import stack
from worker.sweeper import LOCK_KEY, Sweeper

pytestmark = pytest.mark.integration
MODEL = "tiny-resnet18"
UPLOAD = (320, 320)  # a noise PNG this size is ~300 KiB and does not compress


@pytest.fixture
def own_stack(tmp_path, settings):
    """A Redis of this test's own, MAX_QUEUED_MB=1 and a 1 s INFLIGHT_TTL_S, and the web app; no worker."""
    from web import create_app

    ARTIFACTS.mkdir(exist_ok=True)
    redis_proc, url = stack.start_redis(tmp_path)
    own = dataclasses.replace(settings, redis_url=url, models=(MODEL,), default_model=MODEL, worker_concurrency=1,
                              max_queued_mb=1, inflight_ttl_s=1)
    app = create_app(own)
    yield own, app, app.extensions["imgsvc"]
    stack.stop(redis_proc)


def test_an_upload_resubmitted_after_its_inflight_entry_expired_is_counted_once(own_stack):
    settings, app, svc = own_stack
    client, upload = app.test_client(), images.noise_png(seed=81_000, size=UPLOAD)
    suffix = f"{MODEL}:test-1:{image_digest(upload)}:k5-g1"
    answers = []
    for _ in range(4):  # no worker: each time its inflight: entry expires and the upload takes the "new" path
        answers.append(submit(client, upload))
        stack.wait_for(lambda: not svc.redis.exists(f"inflight:{suffix}"), 10, "inflight: to expire")
    # One upload of ~300 KiB waits, under the 1 MiB bound: the fourth is not refused "overloaded".
    assert [a.status_code for a in answers] == [202] * 4, answers[-1].get_json()
    # its upload and its message counted once, each of its four job records once
    assert svc.store.queued_bytes() == len(upload) + WAITING_COMPUTATION_BYTES + 4 * WAITING_JOB_BYTES
    worker = stack.start_worker(settings, ARTIFACTS / "counters-worker.log", name="counters")
    try:
        jobs = [wait_done(client, a.get_json()["id"], timeout=60) for a in answers]
        stack.wait_for(lambda: not svc.redis.llen(inference_queue(MODEL)) and not svc.redis.hlen("unacked"), 60,
                       "every copy of its message to be taken")
    finally:
        stack.stop(worker)
    assert [job["status"] for job in jobs] == ["done"] * 4
    assert svc.store.queued_bytes() == 0 and not svc.redis.hlen(QUEUED_SIZES_KEY)


def test_the_sweeper_sets_the_counter_to_what_really_waits(own_stack):
    settings, app, svc = own_stack
    waiting = images.noise_png(seed=81_100, size=UPLOAD)
    assert submit(app.test_client(), waiting).status_code == 202
    gone = Computation(MODEL, "test-1", "0" * 64, OutputOptions())
    svc.redis.hset(QUEUED_SIZES_KEY, gone.suffix, 700_000)  # an upload no longer in Redis, never counted out
    svc.redis.incrby(QUEUED_BYTES_KEY, 5_000_000)  # what an older version leaked
    assert submit(app.test_client(), images.noise_png(seed=81_101, size=UPLOAD)).status_code == 503
    svc.redis.delete(LOCK_KEY)
    Sweeper(settings, svc.redis, svc.celery, name="test", queues=(inference_queue(MODEL),)).sweep()
    assert svc.store.queued_bytes() == len(waiting) + WAITING_COMPUTATION_BYTES + WAITING_JOB_BYTES
    assert svc.redis.hkeys(QUEUED_SIZES_KEY) == [f"{MODEL}:test-1:{image_digest(waiting)}:k5-g1".encode()]
    assert submit(app.test_client(), images.noise_png(seed=81_101, size=UPLOAD)).status_code == 202
