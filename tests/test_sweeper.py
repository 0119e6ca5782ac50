"""A computation whose message was lost is found by the sweeper and completed; no duplicates."""
import dataclasses
import time

import pytest

from shared.jobtypes import JobContext
from shared.keys import COMPUTATIONS_KEY, Computation, OutputOptions, image_digest
from tests import images
from tests.conftest import wait_done
from worker.sweeper import LOCK_KEY, Sweeper

pytestmark = pytest.mark.integration
MODEL = {"name": "efficientnet-lite0", "version": "1.0.0-57934424"}


def _lost_computation(app, seed: int, context: JobContext = JobContext()):
    """Accept a job the way the web tier does, but never send its task (a lost message)."""
    store = app.extensions["imgsvc"].store
    data = images.noise_png(seed=seed)
    comp = Computation(MODEL["name"], MODEL["version"], image_digest(data), OutputOptions())
    sub = store.submit(comp, MODEL, data, {"sha256": comp.sha256, "format": "PNG", "width": 64, "height": 48},
                       context=context)
    assert sub.outcome == "new"
    return comp, sub.job_id


def _sweeper(app, settings, redis_client):
    redis_client.delete(LOCK_KEY)
    return Sweeper(dataclasses.replace(settings, stuck_after_s=60), redis_client,
                   app.extensions["imgsvc"].celery, name="test-sweeper")


def test_a_lost_message_is_requeued_and_the_job_completes(worker, app, client, settings, redis_client):
    comp, job_id = _lost_computation(app, seed=9100)
    redis_client.zadd(COMPUTATIONS_KEY, {comp.suffix: 0})  # overdue now
    counts = _sweeper(app, settings, redis_client).sweep()
    assert counts["requeued"] == 1
    assert wait_done(client, job_id)["status"] == "done"
    assert redis_client.zscore(COMPUTATIONS_KEY, comp.suffix) is None  # finishing removed it


def test_an_owned_computation_gets_more_time_and_expired_bytes_fail(worker, app, client, settings, redis_client):
    owned, _ = _lost_computation(app, seed=9200)
    name = redis_client.zrange("workers", 0, 0)[0].decode()  # a live worker child
    redis_client.set(owned.owner_key, name)
    expired, expired_job = _lost_computation(app, seed=9201)
    redis_client.delete(expired.image_key)
    redis_client.zadd(COMPUTATIONS_KEY, {owned.suffix: 0, expired.suffix: 0})
    counts = _sweeper(app, settings, redis_client).sweep()
    assert (counts["extended"], counts["expired"]) == (1, 1)
    assert redis_client.zscore(COMPUTATIONS_KEY, owned.suffix) > 0
    job = wait_done(client, expired_job)
    assert job["status"] == "failed" and job["error"]["code"] == "image_expired"
    redis_client.delete(owned.inflight_key, owned.owner_key)
    redis_client.zrem(COMPUTATIONS_KEY, owned.suffix)


def test_only_one_sweeper_runs_a_round(app, settings, redis_client):
    first = _sweeper(app, settings, redis_client)
    second = Sweeper(settings, redis_client, app.extensions["imgsvc"].celery, name="other")
    first.sweep()
    assert not any(second.sweep().values())
    assert redis_client.get(LOCK_KEY) == b"test-sweeper"


def test_a_lost_computation_whose_jobs_all_passed_their_deadline_is_not_sent_again(app, client, settings,
                                                                                   redis_client):
    comp, job_id = _lost_computation(app, seed=9300, context=JobContext(deadline_at=time.time() - 1))
    redis_client.zadd(COMPUTATIONS_KEY, {comp.suffix: 0})  # overdue now
    counts = _sweeper(app, settings, redis_client).sweep()
    assert (counts["unwaited"], counts["requeued"]) == (1, 0)
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert (job["status"], job["error"]["code"]) == ("failed", "deadline_exceeded")
    assert redis_client.zscore(COMPUTATIONS_KEY, comp.suffix) is None and not redis_client.exists(comp.inflight_key)
