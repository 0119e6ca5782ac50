"""A Redis restart in the middle of a stream of uploads: the web answers 503 (never 500, never a
long hang) while Redis is away, and every upload that got a 202 still ends done."""
import dataclasses
import time

import pytest

from tests import images
from tests.conftest import ARTIFACTS, submit
from tools import stack

pytestmark = pytest.mark.integration
STREAM_S = 8
OUTAGE_AT_S, OUTAGE_S = 2.0, 2.5


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory, settings):
    workdir = tmp_path_factory.mktemp("outage-redis")
    port = stack.free_port()
    redis_proc, url = stack.start_redis(workdir, port=port, aof=True)
    own = dataclasses.replace(settings, redis_url=url, stuck_after_s=5, sweep_interval_s=1)
    worker = stack.start_worker(own, ARTIFACTS / "outage-worker.log", name="outage")
    from web import create_app

    holder = {"redis": redis_proc}
    yield own, create_app(own), holder, workdir, port
    stack.stop(worker)
    stack.stop(holder["redis"])


def test_redis_restart_loses_no_accepted_job(outage_stack):
    settings, app, holder, workdir, port = outage_stack
    client = app.test_client()
    accepted, statuses, slowest = [], [], 0.0
    start, seed, restarted = time.monotonic(), 30_000, False
    while time.monotonic() - start < STREAM_S:  # bounded in time and (by the sleep) in count
        elapsed = time.monotonic() - start
        if holder["redis"].poll() is None and OUTAGE_AT_S <= elapsed < OUTAGE_AT_S + OUTAGE_S:
            stack.stop(holder["redis"])  # SIGTERM: Redis flushes its AOF and exits
        if holder["redis"].poll() is not None and elapsed >= OUTAGE_AT_S + OUTAGE_S and not restarted:
            holder["redis"], _ = stack.start_redis(workdir, port=port, aof=True)
            restarted = True
        sent = time.monotonic()
        answer = submit(client, images.noise_png(seed=seed, size=(48, 32)))
        slowest = max(slowest, time.monotonic() - sent)
        seed += 1
        statuses.append(answer.status_code)
        if answer.status_code == 202:
            accepted.append(answer.get_json()["id"])
        else:
            assert answer.status_code == 503 and answer.get_json()["error"]["code"] in ("unavailable", "overloaded")
            assert "Retry-After" in answer.headers
        time.sleep(0.05)
    assert restarted and 503 in statuses and statuses.count(202) > 10
    assert slowest < 5, f"a request took {slowest:.1f} s while Redis was away"

    store = app.extensions["imgsvc"].store
    pending, give_up = set(accepted), time.monotonic() + 120
    while pending and time.monotonic() < give_up:
        for job_id in list(pending):
            job = store.get(job_id)
            assert job is not None, f"accepted job {job_id} vanished"
            if job["status"] == "done":
                pending.discard(job_id)
        time.sleep(0.5)
    assert not pending, f"{len(pending)} of {len(accepted)} accepted jobs never finished"
