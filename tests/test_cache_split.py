"""Two Redis roles: REDIS_URL keeps jobs and queues (noeviction), CACHE_URL keeps results and
heatmaps and may evict them (allkeys-lru). An evicted result is computed again, never an error,
and identical uploads still share one computation across the two servers."""
from __future__ import annotations

import concurrent.futures
import json
import time
import uuid

import pytest
import redis
import requests

from shared.jobs import KEEP_UPLOAD, JobStore
from shared.keys import Computation, OutputOptions, webhook_attempts_key, webhook_event_key, webhook_events_key
from shared.retention import MAIN_TAIL_S, issued_at, new_job_id
from shared.settings import Settings
from shared.webhooks import EventStore
from tests.conftest import ARTIFACTS
from tests.images import noise_png
from tools.stack import free_port, start_redis, start_web, start_worker, stop, wait_for

CACHE_MAXMEMORY = ("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")
INFO, MODEL = {"sha256": "x", "format": "PNG", "width": 1, "height": 1}, {"name": "m", "version": "1"}
RESULT = {"predictions": [{"label": "cat"}], "gradcam": {"class_index": 3}}


def _store(main: redis.Redis, cache: redis.Redis) -> JobStore:
    return JobStore(main, job_ttl_s=60, result_ttl_s=60, inflight_ttl_s=60, image_ttl_s=60, cache=cache)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    main_proc, main_url = start_redis(tmp_path_factory.mktemp("main"))
    cache_proc, cache_url = start_redis(tmp_path_factory.mktemp("cache"), extra=CACHE_MAXMEMORY)
    yield main_url, cache_url
    stop(main_proc)
    stop(cache_proc)


@pytest.fixture
def clients(servers):
    main, cache = (redis.Redis.from_url(url) for url in servers)
    main.flushall()
    cache.flushall()
    return main, cache


def test_each_job_keeps_its_answer_and_the_cache_gets_the_rest(clients):
    main, cache = clients
    store = _store(main, cache)
    comp = Computation("m", "1", "a" * 64, OutputOptions())
    first = store.submit(comp, MODEL, b"upload", INFO)
    second = store.submit(comp, MODEL, b"upload", INFO)
    assert (first.outcome, second.outcome) == ("new", "attached")
    store.claim([comp])
    store.finish(comp, RESULT, KEEP_UPLOAD)
    assert cache.get(comp.result_key) and cache.get(comp.picture_key) == b"upload"
    assert json.loads(cache.get(comp.meta_key)) == INFO
    assert not main.exists(comp.picture_key)  # pictures live on the cache server only
    assert 0 < main.ttl(comp.result_key) <= 600  # a short copy for uploads racing the cache write
    cache.flushall()  # the cache evicts everything: the jobs still hold their answers
    for job_id in (first.job_id, second.job_id):
        job = store.get(job_id)
        assert job["status"] == "done" and job["result"]["predictions"] == RESULT["predictions"]


def test_an_upload_racing_the_cache_write_finds_the_result_on_the_main_server(clients):
    """The web reads the cache (miss), the worker settles on the main server, then the web's
    submit runs: it must find the result there, not start a second computation."""
    main, cache = clients
    store = _store(main, cache)
    comp = Computation("m", "1", "b" * 64, OutputOptions())
    store.submit(comp, MODEL, b"upload", INFO)
    store.claim([comp])
    store.finish(comp, RESULT, None)
    cache.delete(comp.result_key, comp.meta_key)  # as if the copy to the cache had not happened yet
    again = store.submit(comp, MODEL, b"upload", INFO)
    assert again.outcome == "cached" and json.loads(again.json())["result"] == RESULT
    main.delete(comp.result_key)  # the short copy expired too: computed again, not an error
    assert store.submit(comp, MODEL, b"upload", INFO).outcome == "new"


def test_a_cache_server_that_is_down_costs_recomputation_not_errors(clients):
    main, _ = clients
    down = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5, retry=None)
    store = _store(main, down)
    comp = Computation("m", "1", "c" * 64, OutputOptions())
    job = store.submit(comp, MODEL, b"upload", INFO)
    assert job.outcome == "new"
    store.claim([comp])
    store.finish(comp, RESULT, KEEP_UPLOAD)
    assert store.get(job.job_id)["result"] == RESULT
    assert store.overlay_png(job.job_id, render=lambda *_: b"PNG") is None  # no picture: 404, not 500


@pytest.fixture(scope="module")
def split_service(servers, cards_dir):
    main_url, cache_url = servers
    settings = Settings(redis_url=main_url, cache_url=cache_url, model_cards_dir=cards_dir,
                        heartbeat_interval_s=1, worker_ttl_s=5, worker_concurrency=1, torch_threads=1,
                        max_batch=4, rate_limit="100000/minute")
    ARTIFACTS.mkdir(exist_ok=True)
    worker = start_worker(settings, ARTIFACTS / "worker-cache-split.log", name="cachesplit")
    web, url = start_web(settings, threads=8)
    yield url, redis.Redis.from_url(main_url), redis.Redis.from_url(cache_url)
    stop(web)
    stop(worker)


def _submit(url: str, image: bytes) -> dict:
    response = requests.post(f"{url}/api/v1/jobs", files={"image": ("noise.png", image, "image/png")}, timeout=30)
    assert response.status_code in (200, 202), response.text
    return response.json()


def _settled(url: str, job_id: str) -> dict:
    def done():
        job = requests.get(f"{url}/api/v1/jobs/{job_id}?wait=5", timeout=30).json()
        return job if job["status"] in ("done", "failed") else None

    return wait_for(done, 180, f"job {job_id}")


def test_an_evicting_cache_never_turns_into_an_error(split_service):
    url, main, cache = split_service
    images = [noise_png(seed, size=(256, 200)) for seed in range(1000, 1024)]  # ~150 KB each, kept as pictures
    first = [_settled(url, _submit(url, image)["id"]) for image in images]
    assert all(job["status"] == "done" and job["result"]["predictions"] for job in first)
    assert int(cache.info("stats")["evicted_keys"]) > 0  # 24 pictures of ~150 KB do not fit in 3 MB
    assert main.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    for job in first:  # every job still answers; a heatmap whose picture was evicted is a clear 404
        assert requests.get(f"{url}/api/v1/jobs/{job['id']}", timeout=10).json()["result"] == job["result"]
        png = requests.get(f"{url}/api/v1/jobs/{job['id']}/gradcam.png", timeout=30)
        assert png.status_code == 200 or (png.status_code == 404 and "left the cache" in png.json()["error"]["message"])
    main.delete(*main.keys("result:*"))  # the main server's short copies expire after 10 minutes
    again = [_settled(url, _submit(url, image)["id"]) for image in images]
    recomputed = [job for job in again if not job["cached"]]
    assert recomputed, "every result survived a 3 MB cache: the eviction was not exercised"
    for before, after in zip(first, again):
        assert after["status"] == "done"
        assert after["result"]["predictions"][0]["label"] == before["result"]["predictions"][0]["label"]


def test_identical_uploads_share_one_computation_across_the_two_servers(split_service):
    url, main, _ = split_service
    image = noise_png(2000, size=(96, 96))
    before = sum(int(v) for v in main.hgetall("stats:computations").values())
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(lambda _: _submit(url, image), range(6)))
    settled = [_settled(url, job["id"]) for job in jobs]
    assert all(job["status"] == "done" for job in settled)
    assert len({json.dumps(job["result"]["predictions"]) for job in settled}) == 1
    assert sum(int(v) for v in main.hgetall("stats:computations").values()) - before == 1


def test_a_settled_job_moves_whole_to_the_cache_and_leaves_a_short_tail(clients):
    main, cache = clients
    store = JobStore(main, job_ttl_s=3600, result_ttl_s=3600, inflight_ttl_s=60, image_ttl_s=60, cache=cache,
                     job_result_ttl_s=7200)
    comp = Computation("m", "1", "e" * 64, OutputOptions())
    job = store.submit(comp, MODEL, b"upload", INFO)
    main.hset(f"job:{job.job_id}", "traceparent", "00-abc-def-01")  # a field this version does not know
    store.claim([comp])
    store.finish(comp, RESULT, None)
    assert 0 < main.ttl(f"job:{job.job_id}") <= MAIN_TAIL_S
    assert 3600 < cache.ttl(f"job:{job.job_id}") <= 7200
    assert cache.hget(f"job:{job.job_id}", "traceparent") == b"00-abc-def-01"
    main.delete(f"job:{job.job_id}")  # the tail has passed: the job is answered from the cache role
    assert store.get(job.job_id)["result"] == RESULT
    hit = store.submit(comp, MODEL, b"upload", INFO)  # settled at once: moved the same way
    assert hit.outcome == "cached" and 0 < main.ttl(f"job:{hit.job_id}") <= MAIN_TAIL_S
    assert cache.hget(f"job:{hit.job_id}", "status") == b"done"
    cache.flushall()  # evicted: gone, not wrong
    assert store.get(job.job_id) is None


def test_one_server_keeps_a_settled_job_for_its_retention(redis_client):
    store = JobStore(redis_client, job_ttl_s=3600, result_ttl_s=3600, inflight_ttl_s=60, image_ttl_s=60,
                     job_result_ttl_s=7200)
    comp = Computation("m", "1", "9a" * 32, OutputOptions())  # its own image: the session Redis is shared
    job = store.submit(comp, MODEL, b"upload", INFO)
    store.finish(comp, RESULT, None)
    assert 3600 < redis_client.ttl(f"job:{job.job_id}") <= 7200
    assert store.get(job.job_id)["result"] == RESULT


def test_job_ids_tell_when_they_were_issued():
    job_id = new_job_id()
    assert len(job_id) == 32 and abs(issued_at(job_id) - time.time()) < 5
    assert issued_at(uuid.uuid4().hex) is None  # ids from before carry no time
    assert issued_at("f" * 32) is None


def test_an_expired_job_is_told_apart_from_one_never_issued(client):
    expired = client.get(f"/api/v1/jobs/{new_job_id()}")
    assert expired.status_code == 404 and expired.json["error"]["code"] == "expired"
    assert "JOB_RESULT_TTL_S" in expired.json["error"]["message"]
    unknown = client.get(f"/api/v1/jobs/{uuid.uuid4().hex}")
    assert unknown.status_code == 404 and unknown.json["error"]["code"] == "not_found"


def test_a_settled_webhook_event_moves_to_the_cache_and_can_still_be_redelivered(clients):
    main, cache = clients
    events = EventStore(main, 3600, cache, 7200)
    event_id = events.create("job.completed", "job:e1", "https://hooks.example/x", "", '{"id": "e1"}', "00-ab-cd-01")
    keys = [webhook_event_key(event_id), webhook_events_key("job:e1"), webhook_attempts_key("job:e1")]
    assert events.begin_attempt(event_id, "token", 30) == "begun"
    assert events.end_attempt(events.get(event_id), "token", {"status": 200}, "delivered")
    assert all(0 < main.ttl(key) <= MAIN_TAIL_S and 3600 < cache.ttl(key) <= 7200 for key in keys)
    main.delete(*keys)  # the tail has passed: read from the cache role
    settled = events.get(event_id)
    assert settled.state == "delivered" and settled.traceparent == "00-ab-cd-01"
    assert [e.id for e in events.for_subject("job:e1")] == [event_id]
    assert events.attempts("job:e1") == [{"status": 200}]
    events.reopen(settled)  # a manual redelivery brings it back whole to the main server
    assert main.hget(keys[0], "state") == b"pending" and main.hget(keys[0], "body") == settled.body
    assert main.hget(keys[0], "traceparent") == b"00-ab-cd-01" and main.llen(keys[2]) == 1
    assert events.begin_attempt(event_id, "again", 30) == "begun"


def test_a_finished_batch_moves_to_the_cache_and_is_still_answered(split_service):
    url, main, cache = split_service
    files = [("image", (f"{seed}.png", noise_png(seed, size=(64, 64)), "image/png")) for seed in (3000, 3001)]
    batch = requests.post(f"{url}/api/v1/batches", files=files, timeout=30).json()
    for job in batch["jobs"]:
        _settled(url, job["id"])

    def moved():
        return cache.exists(f"batch:{batch['id']}") and 0 < main.ttl(f"batch:{batch['id']}") <= MAIN_TAIL_S

    wait_for(moved, 60, "the finished batch's copy on the cache role")
    main.delete(f"batch:{batch['id']}", *(f"job:{job['id']}" for job in batch["jobs"]))  # their tails passed
    again = requests.get(f"{url}/api/v1/batches/{batch['id']}", timeout=10).json()
    assert again["status"] == "done" and again["counts"]["done"] == 2


def test_a_job_whose_image_url_failed_leaves_the_main_server_like_any_settled_job(clients):
    """A download that fails settles its job like a computation does: a short tail on the main server,
    the whole record on the cache role (before, it stayed on the main server for JOB_TTL_S, 7 days)."""
    from shared.fetches import FetchStore
    from shared.jobs import JobContext
    from shared.keys import job_key
    from shared.retention import MAIN_TAIL_S, new_job_id

    main, cache = clients
    store = _store(main, cache)
    fetches, job_id = FetchStore(store), new_job_id()
    fetches.create(job_id, "https://images.example/cat.png", MODEL, {"top_k": 5, "gradcam": True}, JobContext())
    assert fetches.fail(job_id, {"code": "fetch_failed", "message": "Fetching the image_url failed: 404."})
    assert 0 < main.ttl(job_key(job_id)) <= MAIN_TAIL_S
    assert cache.hget(job_key(job_id), "status") == b"failed" and cache.ttl(job_key(job_id)) > MAIN_TAIL_S
    main.delete(job_key(job_id))  # the tail ran out: the job is read from the cache role
    assert store.get(job_id)["error"]["code"] == "fetch_failed"
    assert not fetches.fail(job_id, {"code": "fetch_failed", "message": "again"})  # a redelivered message


def test_a_jobs_second_webhook_event_adds_to_what_the_cache_kept_of_its_first(clients):
    """`job.started` settles, its subject's list and attempt log move to the cache role and leave the
    main server; `job.completed` settles later: both events and both attempts stay listed (before,
    the second move replaced the first's list and log)."""
    from shared.keys import webhook_attempts_key, webhook_events_key
    from shared.webhooks import EventStore

    main, cache = clients
    events, subject = EventStore(main, 60, cache, 600), "job:0190f1c2a3b47c4d8e9fa0b1c2d3e4f5"
    made = []
    for kind, tag in (("job.started", "started"), ("job.completed", "")):
        event_id = events.create(kind, subject, "https://hooks.example/in", "", "{}", tag=tag,
                                 after=made[-1] if made else "")
        assert events.begin_attempt(event_id, "token", 30) == "begun"
        entry = {"event_id": event_id, "attempt": 1, "status": 200}
        assert events.end_attempt(events.get(event_id), "token", entry, "delivered")
        made.append(event_id)
        main.delete(webhook_events_key(subject), webhook_attempts_key(subject))  # the main tail ran out
    assert [e.id for e in events.for_subject(subject)] == made
    assert [a["event_id"] for a in events.attempts(subject)] == made
