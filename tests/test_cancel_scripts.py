"""The CANCEL script and the claim's deadline and skip, against a real Redis (no worker)."""
import json
import time

import pytest

from shared.jobs import Claim, JobStore
from shared.jobtypes import JobContext
from shared.jobscripts import WAITING_COMPUTATION_BYTES, WAITING_JOB_BYTES
from shared.keys import (ANNOUNCE_KEY, COMPUTATIONS_KEY, QUEUED_BYTES_KEY, QUEUED_KEYS_KEY, QUEUED_SHARES_KEY,
                         QUEUED_SIZES_KEY, Computation, OutputOptions)

MODEL = {"name": "m", "version": "1"}
RESULT = {"predictions": [], "gradcam": None}


@pytest.fixture
def store(redis_client):
    return JobStore(redis_client, job_ttl_s=60, result_ttl_s=60, inflight_ttl_s=60, image_ttl_s=60,
                    job_result_ttl_s=60)


def _comp(sha: str) -> Computation:
    return Computation("m", "1", sha, OutputOptions())


def _submit(store, comp, context=JobContext()):
    info = {"sha256": comp.sha256, "format": "PNG", "width": 1, "height": 1}
    return store.submit(comp, MODEL, b"img", info, context=context).job_id


def _released(redis_client, comp) -> bool:
    """Nothing of the computation's bookkeeping is left (as after FINISH)."""
    return (not redis_client.exists(comp.inflight_key, comp.attached_key, comp.image_key, comp.owner_key,
                                    comp.attempts_key, comp.meta_key)
            and redis_client.zscore(COMPUTATIONS_KEY, comp.suffix) is None
            and redis_client.hget(QUEUED_SIZES_KEY, comp.suffix) is None)


def test_a_canceled_queued_job_is_skipped_at_claim_and_its_bookkeeping_released(store, redis_client):
    comp = _comp("1" * 64)
    before = int(redis_client.get(QUEUED_BYTES_KEY) or 0)
    job_id = _submit(store, comp)
    # its 3-byte upload, its message and bookkeeping, its job record
    assert int(redis_client.get(QUEUED_BYTES_KEY)) == before + 3 + WAITING_COMPUTATION_BYTES + WAITING_JOB_BYTES
    assert store.cancel([job_id]) == ["canceled"]
    assert store.get(job_id)["status"] == "canceled" and store.get(job_id)["finished_at"]
    assert redis_client.lrange(f"notify:{job_id}", 0, -1) == [b"canceled"]  # long-polls wake up
    assert store.claim([comp]) == [Claim(already_done=False, image=None, attempt=0, skipped=True)]
    assert _released(redis_client, comp)
    assert int(redis_client.get(QUEUED_BYTES_KEY) or 0) == before
    assert store.get(job_id)["status"] == "canceled"
    assert store.cancel([job_id]) == ["already"]  # a second cancel changes nothing


def test_a_skipped_computations_message_delivered_again_is_skipped_again(store, redis_client):
    """A worker that skipped a computation dies before acknowledging its message: the copy delivered
    again is skipped again, with nothing left to release twice and no attempt counted."""
    comp = _comp("8" * 64)
    before = int(redis_client.get(QUEUED_BYTES_KEY) or 0)
    store.cancel([_submit(store, comp)])
    assert store.claim([comp])[0].skipped
    assert store.claim([comp]) == [Claim(already_done=False, image=None, attempt=0, skipped=True)]
    assert _released(redis_client, comp)
    assert int(redis_client.get(QUEUED_BYTES_KEY) or 0) == before  # released once, not twice


def test_a_skipped_computation_gives_back_its_senders_share(store, redis_client):
    """A sender's count of computations in flight (its lane step, MAX_QUEUE_DEPTH_PER_KEY) drops when
    its canceled computation is skipped, not only when one is finished."""
    comp = _comp("96" * 32)  # not test_jobstore's "9" * 64: they share the session's Redis
    info = {"sha256": comp.sha256, "format": "PNG", "width": 1, "height": 1}
    job_id = store.submit(comp, MODEL, b"img", info, share="key:k1").job_id
    assert redis_client.hget(QUEUED_SHARES_KEY, "key:k1") == b"1"
    store.cancel([job_id])
    assert store.claim([comp])[0].skipped
    assert redis_client.hget(QUEUED_SHARES_KEY, "key:k1") is None
    assert redis_client.hget(QUEUED_KEYS_KEY, comp.suffix) is None


def test_cancel_detaches_one_job_and_the_computation_goes_on_for_the_others(store, redis_client):
    comp = _comp("2" * 64)
    first, second, third = (_submit(store, comp) for _ in range(3))
    assert store.cancel([second]) == ["canceled"]
    claim = store.claim([comp])[0]
    assert (claim.skipped, claim.image, claim.attempt) == (False, b"img", 1)
    assert store.finish(comp, RESULT) == [first, third]
    assert [store.get(j)["status"] for j in (first, second, third)] == ["done", "canceled", "done"]
    assert store.get(second)["result"] is None


def test_a_running_job_ends_canceled_at_once_and_its_computation_still_fills_the_cache(store, redis_client):
    comp = _comp("3" * 64)
    job_id = _submit(store, comp)
    store.claim([comp])
    assert store.get(job_id)["status"] == "running"
    assert store.cancel([job_id]) == ["canceled"]
    assert store.finish(comp, RESULT) == []  # nobody left to settle: the canceled job keeps its status
    assert store.get(job_id)["status"] == "canceled"
    assert json.loads(redis_client.get(comp.result_key)) == RESULT
    assert store.submit(comp, MODEL).outcome == "cached"


def test_cancelling_a_settled_job_changes_nothing(store):
    comp = _comp("4" * 64)
    job_id = _submit(store, comp)
    store.claim([comp])
    store.finish(comp, RESULT)
    settled = store.get(job_id)
    assert store.cancel([job_id, "0" * 32]) == ["settled", "missing"]
    assert store.get(job_id) == settled


def test_a_canceled_job_awaiting_events_is_listed_for_the_announcer(store, redis_client):
    comp = _comp("5" * 64)
    announced = []
    store.on_settled = announced.extend
    job_id = _submit(store, comp, JobContext("key1", "http://example.test/hook"))
    assert store.cancel([job_id]) == ["canceled"]
    assert announced == [job_id] and redis_client.zscore(ANNOUNCE_KEY, job_id) is not None
    assert redis_client.ttl(f"job:{job_id}") > 30  # kept until its events are made (job TTL), not the tail


def test_a_queued_job_past_its_deadline_fails_at_claim_without_being_computed(store, redis_client):
    comp = _comp("6" * 64)
    announced = []
    store.on_settled = announced.extend
    expired = _submit(store, comp, JobContext("k", "http://example.test/hook", deadline_at=time.time() - 1))
    assert store.claim([comp])[0].skipped
    job = store.get(expired)
    assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded"
    assert announced == [expired]
    assert redis_client.lrange(f"notify:{expired}", 0, -1) == [b"failed"]
    assert _released(redis_client, comp)


def test_only_the_expired_job_leaves_a_computation_others_still_wait_for(store):
    comp = _comp("7" * 64)
    expired = _submit(store, comp, JobContext(deadline_at=time.time() - 1))
    patient = _submit(store, comp, JobContext(deadline_at=time.time() + 60))
    waiting = _submit(store, comp)
    claim = store.claim([comp])[0]
    assert not claim.skipped and claim.attempt == 1
    assert store.finish(comp, RESULT) == [patient, waiting]
    assert [store.get(j)["status"] for j in (expired, patient, waiting)] == ["failed", "done", "done"]


def test_a_job_canceled_before_its_image_arrived_stays_canceled(store, redis_client):
    # an image_url job: written before its image, then submitted under its own id by the fetcher
    comp = _comp("8" * 64)
    job_id = "0" * 31 + "1"
    redis_client.hset(f"job:{job_id}", mapping={"id": job_id, "status": "queued", "image": "null", "fetch": "1",
                                                "model": json.dumps(MODEL), "options": "{}"})
    assert store.cancel([job_id]) == ["canceled"]
    assert not redis_client.hexists(f"job:{job_id}", "fetch")  # its download is skipped
    info = {"sha256": comp.sha256, "format": "PNG", "width": 1, "height": 1}
    assert store.submit(comp, MODEL, b"img", info, job_id=job_id).outcome == "canceled"
    assert store.get(job_id)["status"] == "canceled" and not redis_client.exists(comp.inflight_key)


def test_the_sweepers_check_releases_a_computation_whose_jobs_all_passed_their_deadline(store, redis_client):
    comp = _comp("a1" * 32)
    expired = _submit(store, comp, JobContext(deadline_at=time.time() - 1))
    assert store.drop_unwaited(comp) is True
    assert store.get(expired)["error"]["code"] == "deadline_exceeded"
    assert _released(redis_client, comp)
    other = _comp("a2" * 32)
    _submit(store, other, JobContext(deadline_at=time.time() - 1))
    waiting = _submit(store, other)
    assert store.drop_unwaited(other) is False  # a job still waits: it is sent again
    assert store.claim([other])[0].attempt == 1 and store.get(waiting)["status"] == "running"
