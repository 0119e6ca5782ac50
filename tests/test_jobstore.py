"""Single-flight bookkeeping against a real Redis (no worker): attach, settle, cache."""
import json

import pytest

from shared.jobjson import GRADCAM_URL_SLOT
from shared.jobs import KEEP_UPLOAD, Claim, JobStore
from shared.keys import Computation, OutputOptions


@pytest.fixture
def store(redis_client):
    return JobStore(redis_client, job_ttl_s=60, result_ttl_s=60, inflight_ttl_s=60, image_ttl_s=60,
                    job_result_ttl_s=60)


def _comp(sha: str, **options) -> Computation:
    return Computation("m", "1", sha, OutputOptions(**options))


INFO, MODEL = {"sha256": "x", "format": "PNG", "width": 1, "height": 1}, {"name": "m", "version": "1"}


def test_identical_submissions_share_one_computation(store):
    comp = _comp("a" * 64)
    first = store.submit(comp, MODEL, b"img", INFO)
    second = store.submit(comp, MODEL, b"img", INFO)
    assert (first.outcome, second.outcome) == ("new", "attached")
    assert store.claim([comp]) == [Claim(already_done=False, image=b"img", attempt=1)]
    assert [store.get(j)["status"] for j in (first.job_id, second.job_id)] == ["running", "running"]
    settled = store.finish(comp, {"predictions": [], "gradcam": {"class_index": 3, "url": GRADCAM_URL_SLOT}},
                           KEEP_UPLOAD)
    assert settled == [first.job_id, second.job_id]
    renders = []

    def render(model, result, picture):
        renders.append((model, json.loads(result)["gradcam"]["class_index"], picture))
        return b"PNG"

    for job_id in settled:
        job = store.get(job_id)
        assert job["status"] == "done" and job["cached"] is False
        assert job["result"]["gradcam"]["url"] == f"/api/v1/jobs/{job_id}/gradcam.png"
        assert store.overlay_png(job_id, render=render) == b"PNG"
    # Rendered once, on the first request, from the upload itself (kept, not copied); then cached.
    assert renders == [("m", 3, b"img")]
    assert store.redis.get(comp.picture_key) == b"img" and not store.redis.exists(comp.image_key)
    claim = store.claim([comp])[0]
    assert (claim.already_done, claim.image) == (True, None)  # result written, bytes gone
    assert store.submit(comp, MODEL).outcome == "cached"  # a lookup without the bytes hits too
    third = store.submit(comp, MODEL, b"img", INFO)
    assert third.outcome == "cached"
    assert json.loads(third.cached_result)["gradcam"]["class_index"] == 3
    assert store.get(third.job_id)["cached"] is True


def test_a_lookup_writes_nothing_on_a_miss(store, redis_client):
    comp = _comp("e" * 64)
    assert store.submit(comp, MODEL).outcome == "miss"
    assert not redis_client.exists(comp.inflight_key, comp.image_key, comp.meta_key)
    first = store.submit(comp, MODEL, b"img", INFO)
    lookup = store.submit(comp, MODEL)
    assert (first.outcome, lookup.outcome) == ("new", "attached")
    assert store.get(lookup.job_id)["image"] == INFO  # the header facts come from the first upload


def test_attempts_are_counted_until_the_computation_ends(store, redis_client):
    comp = _comp("f" * 64)
    store.submit(comp, MODEL, b"img", INFO)
    assert [store.claim([comp])[0].attempt for _ in range(3)] == [1, 2, 3]
    store.fail(comp, {"code": "worker_crashed", "message": "x"})
    assert not redis_client.exists(comp.attempts_key)


def test_other_options_are_another_computation(store):
    sha = "b" * 64
    assert store.submit(_comp(sha, top_k=5), MODEL, b"i", INFO).outcome == "new"
    assert store.submit(_comp(sha, top_k=3), MODEL, b"i", INFO).outcome == "new"
    assert store.submit(_comp(sha, gradcam=False), MODEL, b"i", INFO).outcome == "new"


def test_failure_settles_every_job_and_caches_nothing(store):
    comp = _comp("c" * 64)
    ids = [store.submit(comp, MODEL, b"i", INFO).job_id for _ in range(3)]
    assert store.fail(comp, {"code": "decode_failed", "message": "bad"}) == ids
    for job_id in ids:
        job = store.get(job_id)
        assert job["status"] == "failed" and job["error"]["code"] == "decode_failed"
    assert store.submit(comp, MODEL, b"i", INFO).outcome == "new"  # a failure is not cached


def test_every_key_expires(store, redis_client):
    comp = _comp("d" * 64)
    sub = store.submit(comp, MODEL, b"i", INFO)
    store.finish(comp, {"predictions": [], "gradcam": {"class_index": 0, "url": GRADCAM_URL_SLOT}},
                 b"a thumbnail")
    assert store.overlay_png(sub.job_id, render=lambda *_: b"PNG") == b"PNG"
    for key in (f"job:{sub.job_id}", comp.result_key, comp.picture_key, comp.overlay_key, comp.meta_key):
        assert 0 < redis_client.ttl(key) <= 60, key


def test_a_failure_reported_after_the_result_changes_nothing(store, redis_client):
    comp = _comp("f" * 64)
    sub = store.submit(comp, MODEL, b"img", INFO)
    store.finish(comp, {"predictions": [], "gradcam": None})
    counted = store.computations()
    assert store.fail(comp, {"code": "timeout", "message": "late"}) == []
    assert store.get(sub.job_id)["status"] == "done" and redis_client.exists(comp.meta_key)
    assert store.computations() == counted
    assert store.submit(comp, MODEL).outcome == "cached"


def test_a_second_finish_of_the_same_computation_keeps_the_first_answer(store, redis_client):
    # A worker cut off from Redis finishes work the sweeper had done elsewhere; its writes arrive later.
    comp = _comp("9" * 64)
    sub = store.submit(comp, MODEL, b"img", INFO)
    first = {"predictions": [{"index": 1}], "gradcam": None, "batch_size": 1}
    assert store.finish(comp, first, b"thumb-1") == [sub.job_id]
    assert store.finish(comp, {"predictions": [{"index": 1}], "gradcam": None, "batch_size": 4}, b"thumb-2") == []
    assert store.get(sub.job_id)["result"] == first
    assert redis_client.get(comp.picture_key) == b"thumb-1"


@pytest.mark.parametrize("lane, weight", [("interactive", 1.0), ("bulk", 1.0), ("interactive", 10.0), ("bulk", 0.5)])
def test_a_new_computations_message_is_pushed_in_the_same_step_at_step_fors_step(store, redis_client, lane, weight):
    """SUBMIT picks the step from the sender's computations in flight as shared.tasks.step_for does,
    and pushes the message on that step's list; an attach or a hit pushes nothing."""
    from celery import Celery

    from shared.keys import QUEUED_SHARES_KEY, image_digest
    from shared.tasks import inference_message, inference_queue, priority_lists, step_for

    celery, queue = Celery("jobstore-test", set_as_current=False), inference_queue("m")
    for in_flight in (0, 9, 10, 99, 100, 4_999, 12_345, 10**6):
        redis_client.hset(QUEUED_SHARES_KEY, "key:k", in_flight)
        comp = _comp(image_digest(f"step-test {lane} {weight} {in_flight}".encode()))
        message = inference_message(celery, comp, "", lane, weight)
        new = store.submit(comp, MODEL, b"img", INFO, queue=queue, share="key:k", message=message)
        step = step_for(lane, in_flight, weight)
        assert (new.outcome, new.in_flight, new.step) == ("new", in_flight, step)
        assert [redis_client.llen(name) for name in priority_lists(queue)] == [int(s == step) for s in range(10)]
        assert redis_client.rpop(priority_lists(queue)[step]).decode() == message.text(step)
        attached = store.submit(comp, MODEL, b"img", INFO, queue=queue, share="key:k", message=message)
        assert (attached.outcome, attached.step) == ("attached", None)
        assert not any(redis_client.llen(name) for name in priority_lists(queue))
    plain = store.submit(_comp(image_digest(f"step-test {lane} {weight}".encode())), MODEL, b"img", INFO, queue=queue, share="key:k")
    assert (plain.outcome, plain.step) == ("new", None) and not redis_client.llen(queue)  # no message: none pushed
