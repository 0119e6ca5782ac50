"""No unbounded blocking in web threads, and idempotency under failure, against a real Redis.

Callback lookups at submit are bounded in time; long-polls are bounded in number per process and all
wake when their job settles; an Idempotency-Key whose first request died lapses after its lease; a
batch is made whole or not at all; a key belongs to one endpoint.
"""
import dataclasses
import secrets
import socket
import threading
import time

import pytest
import redis

from shared.batches import BatchStore
from shared.keys import COMPUTATIONS_KEY, QUEUED_SIZES_KEY, Computation, OutputOptions, batch_key, idempotency_key, \
    image_digest, job_key, notify_key
from tests import images
from tests.test_integrators import MODEL, post_batch, post_job
from tools.stack import wait_for

pytestmark = pytest.mark.integration
WAITERS = 3
LEASE_S = 2
RESOLVE_TIMEOUT_S = 1
SLOW_HOST = "slow-dns.example"


@pytest.fixture(scope="module")
def limited(settings):
    """The app with few waiters, a short idempotency lease and a short callback lookup bound."""
    from web import create_app

    return create_app(dataclasses.replace(settings, max_waiters=WAITERS, idempotency_lease_s=LEASE_S,
                                          callback_resolve_timeout_s=RESOLVE_TIMEOUT_S))


@pytest.fixture
def slow_dns(monkeypatch):
    """A resolver that hangs on SLOW_HOST (as a DNS server that does not answer) and answers the rest."""
    real, release = socket.getaddrinfo, threading.Event()

    def getaddrinfo(host, *args, **kwargs):
        if host == SLOW_HOST:
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    release.set()


def test_a_callback_host_that_does_not_resolve_in_time_is_refused_within_the_bound(limited, slow_dns):
    started = time.monotonic()
    answer = post_job(limited.test_client(), images.noise_png(seed=7001), callback_url=f"http://{SLOW_HOST}/hook")
    elapsed = time.monotonic() - started
    error = answer.get_json()["error"]
    assert (answer.status_code, error["code"]) == (422, "invalid_callback_url")
    assert SLOW_HOST in error["message"] and f"within {RESOLVE_TIMEOUT_S} s" in error["message"]
    assert elapsed < RESOLVE_TIMEOUT_S + 1.5, elapsed


def queued_job(app) -> tuple[str, Computation]:
    """A job whose computation no worker serves: it stays queued until the test settles it."""
    svc = app.extensions["imgsvc"]
    comp = Computation("nobody-serves-this", "1", secrets.token_hex(32), OutputOptions())
    submission = svc.store.submit(comp, {"name": comp.model, "version": comp.version}, b"image bytes",
                                  {"sha256": comp.sha256, "format": "PNG", "width": 1, "height": 1})
    assert submission.outcome == "new"
    return submission.job_id, comp


def blocked_waiters(redis_client) -> int:
    return sum(1 for c in redis_client.client_list() if c["cmd"] in ("blpop", "blmove") and "b" in c["flags"])


def start_waiters(app, job_id: str, count: int, wait_s: int = 20) -> tuple[list[threading.Thread], list]:
    answers = []

    def wait():
        answer = app.test_client().get(f"/api/v1/jobs/{job_id}?wait={wait_s}")
        answers.append((time.monotonic(), answer))

    threads = [threading.Thread(target=wait, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, answers


def test_every_waiter_on_a_job_wakes_when_it_settles(limited, redis_client):
    job_id, comp = queued_job(limited)
    threads, answers = start_waiters(limited, job_id, WAITERS)
    wait_for(lambda: blocked_waiters(redis_client) >= WAITERS, 10, "three blocked waiters")
    settled_at = time.monotonic()
    limited.extensions["imgsvc"].store.finish(comp, {"predictions": []})
    for thread in threads:
        thread.join(25)
    assert len(answers) == WAITERS
    for answered_at, answer in answers:
        assert answer.get_json()["status"] == "done"
        assert answered_at - settled_at < 3, "a waiter slept on after its job settled"
    assert 0 < redis_client.ttl(notify_key(job_id)) <= 60  # the token stays, and still expires


def test_waiters_past_max_waiters_are_answered_at_once(limited, redis_client):
    job_id, comp = queued_job(limited)
    threads, _ = start_waiters(limited, job_id, WAITERS)
    wait_for(lambda: blocked_waiters(redis_client) >= WAITERS, 10, "three blocked waiters")
    try:
        started = time.monotonic()
        answer = limited.test_client().get(f"/api/v1/jobs/{job_id}?wait=5")
        assert time.monotonic() - started < 1
        assert (answer.status_code, answer.get_json()["status"]) == (200, "queued")
        assert answer.headers["Wait-Skipped"] == "too-many-waiters" and answer.headers["Retry-After"] == "1"
    finally:
        limited.extensions["imgsvc"].store.fail(comp, {"code": "inference_failed", "message": "test"})
        for thread in threads:
            thread.join(25)
    waited = limited.test_client().get(f"/api/v1/jobs/{job_id}?wait=5")  # settled: no wait, no mark
    assert "Wait-Skipped" not in waited.headers and waited.get_json()["status"] == "failed"


def test_max_waiters_zero_never_waits(settings):
    from web import create_app

    app = create_app(dataclasses.replace(settings, max_waiters=0))
    job_id, comp = queued_job(app)
    started = time.monotonic()
    answer = app.test_client().get(f"/api/v1/jobs/{job_id}?wait=5")
    assert time.monotonic() - started < 1 and answer.headers["Wait-Skipped"] == "too-many-waiters"
    app.extensions["imgsvc"].store.fail(comp, {"code": "inference_failed", "message": "test"})


def test_an_idempotency_key_whose_first_request_died_is_free_after_its_lease(limited, redis_client):
    from web.intake import Order

    image, client = images.noise_png(seed=7002), limited.test_client()
    svc = limited.extensions["imgsvc"]
    with limited.app_context():  # the first request claimed the key, then its process was killed
        print_ = Order(svc.catalog.get(MODEL), OutputOptions(), None).fingerprint(image_digest(image))
        svc.idempotency.begin("", "dead-first", print_)
    claimed_at = time.monotonic()
    busy = post_job(client, image, {"Idempotency-Key": "dead-first"})
    assert (busy.status_code, busy.get_json()["error"]["code"]) == (409, "idempotency_in_progress")
    assert 1 <= int(busy.headers["Retry-After"]) <= LEASE_S
    time.sleep(max(0.0, claimed_at + LEASE_S + 0.2 - time.monotonic()))
    retried = post_job(client, image, {"Idempotency-Key": "dead-first"})
    assert retried.status_code == 202, retried.get_json()
    assert redis_client.ttl(idempotency_key("", "dead-first")) > LEASE_S * 10  # done: IDEMPOTENCY_TTL_S
    again = post_job(client, image, {"Idempotency-Key": "dead-first"})
    assert again.get_json()["id"] == retried.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"


def test_a_batch_record_is_written_in_one_step(limited, redis_client, redis_url):
    """A Redis that refuses the expiry (here an ACL) must not leave a batch that never expires."""
    redis_client.acl_setuser("no-expire", enabled=True, passwords=["+no-expire-pw"], keys=["*"],
                             categories=["+@all"], commands=["-expire"])
    try:
        refused = redis.Redis.from_url(redis_url, username="no-expire", password="no-expire-pw")
        batches = BatchStore(refused, limited.extensions["imgsvc"].store, 60)
        with pytest.raises(redis.RedisError):
            batches.create("b" + "1" * 30, ["0" * 32], "", None)
        assert not redis_client.exists(batch_key("b" + "1" * 30))
    finally:
        redis_client.acl_deluser("no-expire")


def test_a_batch_that_fails_half_way_leaves_nothing_and_its_retry_is_whole(limited, worker, redis_client,
                                                                           monkeypatch):
    import web.batches

    files = [images.noise_png(seed=seed) for seed in (7003, 7004, 7005)]
    real_accept, made = web.batches.accept, []

    def accept_until_redis_fails(data, order, context, **kwargs):
        made.append((context.batch_id, kwargs["job_id"]))
        if len(made) == 3:
            raise redis.ConnectionError("injected: Redis went away on the third image")
        return real_accept(data, order, context, **kwargs)

    monkeypatch.setattr(web.batches, "accept", accept_until_redis_fails)
    client = limited.test_client()
    failed = post_batch(client, files, {"Idempotency-Key": "half-batch"})
    assert (failed.status_code, failed.get_json()["error"]["code"]) == (503, "unavailable")
    batch_id = made[0][0]
    assert not redis_client.exists(batch_key(batch_id)), "a partial batch was left"
    assert not any(redis_client.exists(job_key(job_id)) for _, job_id in made)
    assert client.get(f"/api/v1/batches/{batch_id}").status_code == 404

    monkeypatch.setattr(web.batches, "accept", real_accept)
    retried = post_batch(client, files, {"Idempotency-Key": "half-batch"})
    assert retried.status_code == 202, retried.get_json()
    batch = retried.get_json()
    assert batch["id"] != batch_id and batch["counts"]["total"] == 3 and len(batch["jobs"]) == 3

    def finished():
        current = client.get(f"/api/v1/batches/{batch['id']}").get_json()
        return current if current["status"] == "done" else None

    assert wait_for(finished, 120, "the retried batch")["counts"]["done"] == 3
    digests = [image_digest(data) for data in files]  # the work the first attempt started is not stranded
    pending = [m.decode() for m in redis_client.zrange(COMPUTATIONS_KEY, 0, -1)]
    waiting = [m.decode() for m in redis_client.hkeys(QUEUED_SIZES_KEY)]
    assert not [m for m in pending + waiting if any(d in m for d in digests)]
    assert not [k for d in digests for k in redis_client.keys(f"inflight:*{d}*")]


def test_an_idempotency_key_belongs_to_one_endpoint(limited):
    client = limited.test_client()
    image = images.noise_png(seed=7006)
    assert post_job(client, image, {"Idempotency-Key": "job-key"}).status_code == 202
    reused = post_batch(client, [image], {"Idempotency-Key": "job-key"})
    assert (reused.status_code, reused.get_json()["error"]["code"]) == (422, "idempotency_key_reused")
    other = images.noise_png(seed=7007)
    assert post_batch(client, [other], {"Idempotency-Key": "batch-key"}).status_code == 202
    reused = post_job(client, other, {"Idempotency-Key": "batch-key"})
    assert (reused.status_code, reused.get_json()["error"]["code"]) == (422, "idempotency_key_reused")
