"""Jobs at the edges of time: an outage longer than every short TTL, a backlog longer than the sweeper's
deadline, and a worker child killed mid-batch. Each on its own real Redis (and worker, where needed)."""
import dataclasses
import os
import signal
import time

import pytest

from shared.keys import COMPUTATIONS_KEY, WORKERS_KEY, webhook_events_key
from shared.tasks import inference_queue
from tests import images
from tests.conftest import ARTIFACTS, submit, wait_done
from tools import stack
from worker.sweeper import LOCK_KEY, Sweeper

pytestmark = pytest.mark.integration
MODEL = "tiny-resnet18"


@pytest.fixture
def own_stack(tmp_path, settings):
    """A Redis of this test's own, settings pointing at it, and the web app; no worker yet."""
    from web import create_app

    redis_proc, url = stack.start_redis(tmp_path)
    own = dataclasses.replace(settings, redis_url=url, models=(MODEL,), default_model=MODEL, worker_concurrency=1,
                              heartbeat_interval_s=1, worker_ttl_s=3, sweep_interval_s=1)
    app = create_app(own)
    yield own, app, app.extensions["imgsvc"]
    stack.stop(redis_proc)


def _sweep(svc, settings) -> dict:
    svc.redis.delete(LOCK_KEY)
    return Sweeper(settings, svc.redis, svc.celery, name="test", queues=(inference_queue(MODEL),)).sweep()


def test_an_outage_longer_than_every_short_ttl_strands_no_job(own_stack, tmp_path):
    from web import create_app

    settings, _, _ = own_stack
    settings = dataclasses.replace(settings, inflight_ttl_s=1, image_ttl_s=60, stuck_after_s=1)
    app = create_app(settings)
    svc, client = app.extensions["imgsvc"], app.test_client()
    with_bytes = submit(client, images.noise_png(seed=61_000), callback_url="http://127.0.0.1:9/hook").get_json()
    without = submit(client, images.noise_png(seed=61_001), callback_url="http://127.0.0.1:9/hook").get_json()
    svc.redis.delete(f"image:{MODEL}:test-1:{without['image']['sha256']}:k5-g1")  # its bytes expired
    time.sleep(2)  # no worker anywhere, past INFLIGHT_TTL_S: today the jobs' attached list expired here
    assert not any(svc.redis.scan_iter("inflight:*"))
    worker = stack.start_worker(dataclasses.replace(settings, worker_ttl_s=3), ARTIFACTS / "outage-worker.log",
                                name="outage")
    try:
        jobs = [wait_done(client, job["id"], timeout=60) for job in (with_bytes, without)]
    finally:
        stack.stop(worker)
    outcomes = sorted((job["status"], (job["error"] or {}).get("code")) for job in jobs)
    assert outcomes == [("done", None), ("failed", "image_expired")]
    for job in jobs:  # each settled job has its webhook event: its callback fires
        assert svc.redis.llen(webhook_events_key(f"job:{job['id']}")) == 1


def test_a_backlog_past_the_deadline_is_not_taken_for_a_lost_message(own_stack):
    settings, app, svc = own_stack
    client = app.test_client()
    ids = [submit(client, images.noise_png(seed=62_000 + i)).get_json()["id"] for i in range(5)]
    queue = inference_queue(MODEL)
    assert svc.redis.llen(queue) == 5  # no worker: they wait, as behind a long backlog
    svc.redis.zadd(COMPUTATIONS_KEY, {m: 0 for m in svc.redis.zrange(COMPUTATIONS_KEY, 0, -1)})  # all overdue
    counts = _sweep(svc, settings)
    assert counts["waiting"] == 5 and counts["requeued"] == 0
    assert svc.redis.llen(queue) == 5  # no second message, nothing pushed toward 503 overloaded
    assert not any(svc.redis.scan_iter("attempts:*"))  # and no attempt counted
    assert all(client.get(f"/api/v1/jobs/{i}").get_json()["status"] == "queued" for i in ids)
    svc.redis.delete(queue)  # the message is lost after all: now the sweeper sends it again
    svc.redis.zadd(COMPUTATIONS_KEY, {m: 0 for m in svc.redis.zrange(COMPUTATIONS_KEY, 0, -1)})
    assert _sweep(svc, settings)["requeued"] == 5 and svc.redis.llen(queue) == 5


def test_work_of_a_dead_child_is_sent_again_at_the_next_sweep(own_stack):
    settings, app, svc = own_stack
    job = submit(app.test_client(), images.noise_png(seed=63_000)).get_json()
    queue = inference_queue(MODEL)
    svc.redis.delete(queue)  # a child took the message into its batch, claimed it...
    [suffix] = [m.decode() for m in svc.redis.zrange(COMPUTATIONS_KEY, 0, -1)]
    svc.redis.set(f"owner:{suffix}", "deadhost:4242")  # ...and died: its heartbeat is not in `workers`
    svc.redis.zadd(COMPUTATIONS_KEY, {suffix: time.time() + 900})  # not due for 15 minutes
    assert _sweep(svc, settings)["orphaned"] == 1
    assert svc.redis.llen(queue) == 1 and not svc.redis.exists(f"owner:{suffix}")
    assert _sweep(svc, settings)["orphaned"] == 0  # once, not every sweep
    assert job["status"] == "queued"


def test_a_child_killed_mid_stream_loses_nothing_and_recovers_in_seconds(own_stack):
    settings, app, svc = own_stack
    settings = dataclasses.replace(settings, max_batch=4, visibility_timeout_s=600, stuck_after_s=600)
    worker = stack.start_worker(settings, ARTIFACTS / "recovery-worker.log", name="recovery")
    client = app.test_client()
    try:
        ids = [submit(client, images.noise_png(seed=64_000 + i, size=(320, 240))).get_json()["id"] for i in range(60)]
        stack.wait_for(lambda: sum(client.get(f"/api/v1/jobs/{i}").get_json()["status"] == "done" for i in ids) >= 8,
                       60, "some jobs to finish")
        [child] = [int(svc.redis.hget(f"worker:{name.decode()}", "pid")) for name in svc.redis.zrange(WORKERS_KEY, 0, -1)]
        os.kill(child, signal.SIGKILL)
        killed_at = time.monotonic()
        jobs = [wait_done(client, job_id, timeout=120) for job_id in ids]
        recovered_in = time.monotonic() - killed_at
    finally:
        stack.stop(worker)
    assert [job["status"] for job in jobs] == ["done"] * 60
    # Well inside the 600 s visibility timeout: the dead child's batch came back through the sweeper.
    assert recovered_in < 90
