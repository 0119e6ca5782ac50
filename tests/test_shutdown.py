"""Graceful shutdown: SIGTERM lets the in-flight work finish, returns the rest, loses nothing."""
import dataclasses
import signal
import time

import pytest

from tests import images
from tests.conftest import ARTIFACTS, submit
from tools import stack

pytestmark = pytest.mark.integration


def test_sigterm_finishes_in_flight_jobs_and_returns_the_rest(tmp_path_factory, settings):
    redis_proc, url = stack.start_redis(tmp_path_factory.mktemp("shutdown-redis"))
    own = dataclasses.replace(settings, redis_url=url, worker_concurrency=1, max_batch=1)
    worker = stack.start_worker(own, ARTIFACTS / "shutdown-worker-1.log", name="shutdown")
    try:
        from web import create_app

        app = create_app(own)
        client = app.test_client()
        ids = [submit(client, images.noise_png(seed=50_000 + i, size=(320, 240))).get_json()["id"]
               for i in range(12)]
        store = app.extensions["imgsvc"].store
        deadline = time.monotonic() + 60
        while not any(store.get(j)["status"] != "queued" for j in ids):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0  # warm shutdown: the running task finished first
        after_stop = [store.get(j)["status"] for j in ids]
        assert "running" not in after_stop  # nothing was left half done
        assert "failed" not in after_stop

        worker = stack.start_worker(own, ARTIFACTS / "shutdown-worker-2.log", name="shutdown")
        deadline = time.monotonic() + 120
        while any(store.get(j)["status"] != "done" for j in ids):
            assert time.monotonic() < deadline, [store.get(j)["status"] for j in ids]
            time.sleep(0.1)
    finally:
        stack.stop(worker)
        stack.stop(redis_proc)
