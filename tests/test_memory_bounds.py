"""Backpressure by bytes (MAX_QUEUED_MB): uploads waiting for workers never fill Redis. Past the
bound new work gets a clear 503 `overloaded`; nothing accepted is lost; the service recovers by
itself once workers drain the queue."""
import dataclasses
import time

import pytest
import redis
import requests

from tests import images
from tests.conftest import ARTIFACTS
from tools import stack

pytestmark = pytest.mark.integration
MAXMEMORY_MB = 48
UPLOAD = (800, 800)  # a noise PNG this size is ~1.9 MB and does not compress


def _stream(base_url, seeds, outcomes):
    for seed in seeds:
        files = {"image": ("big.png", images.noise_png(seed=seed, size=UPLOAD), "image/png")}
        answer = requests.post(f"{base_url}/api/v1/jobs", files=files, timeout=30)
        outcomes.append((answer.status_code, answer.json(), dict(answer.headers)))


def _drain_and_check(url, settings, accepted, name):
    worker = stack.start_worker(settings, ARTIFACTS / f"{name}-worker.log", name=name)
    try:
        main, give_up = redis.Redis.from_url(url), time.monotonic() + 180
        while time.monotonic() < give_up:
            states = [(main.hget(f"job:{job_id}", "status") or b"missing").decode() for job_id in accepted]
            if all(state in ("done", "failed", "missing") for state in states):
                break
            time.sleep(0.5)
        return states, worker
    except BaseException:
        stack.stop(worker)
        raise


def test_uploads_waiting_for_workers_are_bounded_by_bytes(tmp_path, settings):
    proc, url = stack.start_redis(tmp_path, extra=("--maxmemory", f"{MAXMEMORY_MB}mb"))
    worker = web = None
    try:
        from web import create_app

        own = dataclasses.replace(settings, redis_url=url)  # MAX_QUEUED_MB unset: half of maxmemory
        app = create_app(own)
        assert app.extensions["imgsvc"].max_queued_bytes == MAXMEMORY_MB * 1024 * 1024 // 2
        web, base_url = stack.start_web(own)
        outcomes = []
        _stream(base_url, range(70_000, 70_030), outcomes)  # ~57 MB offered, no worker running
        statuses = [status for status, _, _ in outcomes]
        assert all(status in (202, 503) for status in statuses), statuses
        refusals = [body["error"] for status, body, _ in outcomes if status == 503]
        assert refusals and all(error["code"] == "overloaded" and "MAX_QUEUED_MB" in error["message"]
                                for error in refusals), refusals[:2]
        assert all("Retry-After" in headers for status, _, headers in outcomes if status == 503)
        main = redis.Redis.from_url(url)
        assert int(main.info("memory")["used_memory"]) < MAXMEMORY_MB * 1024 * 1024
        accepted = [body["id"] for status, body, _ in outcomes if status == 202]
        assert 8 <= len(accepted) <= 13  # 24 MiB of ~1.9 MB uploads
        states, worker = _drain_and_check(url, own, accepted, "bytes")
        assert states == ["done"] * len(accepted)
        assert app.extensions["imgsvc"].store.queued_bytes() == 0  # every finished upload was counted out
        again = []
        _stream(base_url, range(70_100, 70_103), again)
        assert [status for status, _, _ in again] == [202] * 3  # recovered by itself
    finally:
        for process in (web, worker, proc):
            if process is not None:
                stack.stop(process)


def test_a_redis_at_maxmemory_gives_clear_503s_and_loses_no_accepted_job(tmp_path, settings):
    """With the bound off (MAX_QUEUED_MB=0) uploads fill Redis to maxmemory: new work gets 503
    `overloaded` naming the full store, never a 5xx. Redis refuses the workers' writes too (claims,
    Celery's own bookkeeping), so nothing moves until memory is freed, which is why MAX_QUEUED_MB
    is on by default. Once it is (here: maxmemory raised), every accepted job is done and uploads
    are accepted again."""
    proc, url = stack.start_redis(tmp_path, extra=("--maxmemory", f"{MAXMEMORY_MB}mb"))
    worker = web = None
    try:
        own = dataclasses.replace(settings, redis_url=url, max_queued_mb=0)
        web, base_url = stack.start_web(own)
        outcomes = []
        _stream(base_url, range(71_000, 71_035), outcomes)
        statuses = [status for status, _, _ in outcomes]
        assert all(status in (202, 503) for status in statuses), statuses
        refusals = [body["error"] for status, body, _ in outcomes if status == 503]
        assert refusals and all(e["code"] == "overloaded" and "maxmemory" in e["message"] for e in refusals)
        accepted = [body["id"] for status, body, _ in outcomes if status == 202]
        redis.Redis.from_url(url).config_set("maxmemory", f"{4 * MAXMEMORY_MB}mb")
        states, worker = _drain_and_check(url, own, accepted, "oom")
        assert states == ["done"] * len(accepted), states
        again = []
        _stream(base_url, range(71_100, 71_103), again)
        assert [status for status, _, _ in again] == [202] * 3
    finally:
        for process in (web, worker, proc):
            if process is not None:
                stack.stop(process)
