"""Backlog per worker: waiting jobs per live worker consuming a queue, and the oldest waiting job's age.

On the admin API (``GET /api/v1/admin/queues``) and the web's ``/metrics`` (``imgsvc_queue_workers``,
``imgsvc_queue_backlog_per_worker``), read in one Redis round trip (shared/fleet.py). The unit test
writes heartbeats and real Celery messages to a scratch database; the integration test stops the only
worker with jobs submitted (scale to zero), watches the backlog and its age grow, and starts a worker
again, which takes them.
"""
from __future__ import annotations

import json
import time

import pytest
import redis
import requests
from celery import Celery

from shared import fleet
from shared.keys import WEBHOOK_WORKERS_KEY, WORKERS_KEY, drain_key, worker_key
from shared.metrics import exposition, registry_for
from shared.settings import Settings
from shared.tasks import INFER_TASK, celery_config
from tests import images
from tests.conftest import ARTIFACTS, write_slow_card
from tests.test_metrics import samples
from tools.stack import start_redis, start_web, start_worker, stop, wait_for

SCRATCH_DB = 12  # away from the session worker's db 0 and test_metrics' db 11
NOW = 1_800_000_000.0
TOKEN = "test-backlog-token-5b2e9d71c04f3a86"  # ADMIN_TOKEN and METRICS_TOKEN need 32+ characters
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class CountingRedis(redis.Redis):
    """A client that counts the commands it sends (a pipeline's execute is one)."""

    sent = 0

    def execute_command(self, *args, **options):
        self.sent += 1
        return super().execute_command(*args, **options)


@pytest.fixture
def scratch(redis_url):
    url = redis_url.rsplit("/", 1)[0] + f"/{SCRATCH_DB}"
    client = CountingRedis.from_url(url)
    client.flushdb()
    yield client, url
    client.flushdb()


def beat(client: redis.Redis, name: str, node: str, models: dict, seen: float) -> None:
    """Write a child's heartbeat as worker/heartbeat.py does (only the fields the backlog reads)."""
    client.hset(worker_key(name), mapping={"node": node, "models": json.dumps(models), "last_seen": seen})
    client.zadd(WORKERS_KEY, {name: seen})


def send(url: str, queue: str, enqueued_at: list[float], priority: int = 0) -> None:
    """Send real Celery messages (kombu's Redis layout) carrying ``enqueued_at``, in this order."""
    app = Celery("backlog-test")
    app.conf.update(celery_config(Settings(redis_url=url)))
    for when in enqueued_at:
        app.send_task(INFER_TASK, args=[{"enqueued_at": when}], queue=queue, priority=priority)
    app.close()


def test_backlog_counts_live_children_of_active_nodes_per_model_queue(scratch):
    client, url = scratch
    beat(client, "h:1:a", "a@h", {"m": "1"}, NOW - 1)
    beat(client, "h:2:a", "a@h", {"m": "1", "n": "1"}, NOW - 2)
    beat(client, "h:3:b", "b@h", {"m": "1"}, NOW - 1)
    client.set(drain_key("b@h"), "1")  # draining: consumes nothing, so it is no capacity
    beat(client, "h:4:c", "c@h", {"m": "1"}, NOW - 60)  # gone: its heartbeat is past the TTL
    client.zadd(WEBHOOK_WORKERS_KEY, {"webhooks@h": NOW - 1})
    send(url, "inference.m", [NOW - 20, NOW - 15, NOW - 12, NOW - 10])
    send(url, "inference.m", [NOW - 30], priority=7)  # the bulk lane's list holds the oldest
    send(url, "inference.o", [NOW - 4])  # no worker serves model o

    names = fleet.known_queues(["m", "n", "o"])
    fleet.queues(client, names, ttl_s=20, now=NOW)  # the first call loads the script into Redis
    client.sent = 0
    queues = {q["name"]: q for q in fleet.queues(client, names, ttl_s=20, now=NOW)}
    assert client.sent == 1  # then one round trip (EVALSHA), whatever the fleet's size
    assert queues["inference.m"] == {"name": "inference.m", "depth": 5, "oldest_age_s": 30.0, "workers": 2,
                                     "backlog_per_worker": 2.5, "lanes": {"interactive": 4, "bulk": 1}}
    assert queues["inference.n"] == {"name": "inference.n", "depth": 0, "oldest_age_s": None, "workers": 1,
                                     "backlog_per_worker": 0.0, "lanes": {"interactive": 0, "bulk": 0}}
    # No worker: the whole backlog, what the first one to start will face.
    assert queues["inference.o"] == {"name": "inference.o", "depth": 1, "oldest_age_s": 4.0, "workers": 0,
                                     "backlog_per_worker": 1.0, "lanes": {"interactive": 1, "bulk": 0}}
    assert queues["webhooks"]["workers"] == 1 and queues["webhooks"]["depth"] == 0
    assert queues["fetches"]["workers"] == 1 and queues["fetches"]["depth"] == 0  # image_url downloads


def test_backlog_gauges_on_the_metrics_exposition(scratch):
    client, url = scratch
    beat(client, "h:1:a", "a@h", {"m": "1"}, time.time())
    beat(client, "h:2:a", "a@h", {"m": "1"}, time.time())
    send(url, "inference.m", [time.time() - 9] * 3)
    parsed = samples(exposition(registry_for(client, ttl_s=20, models=["m"])).decode())
    queue = (("queue", "inference.m"),)
    assert parsed[("imgsvc_queue_depth", queue)] == 3
    assert parsed[("imgsvc_queue_workers", queue)] == 2
    assert parsed[("imgsvc_queue_backlog_per_worker", queue)] == 1.5
    assert 9 <= parsed[("imgsvc_queue_oldest_age_seconds", queue)] < 30


@pytest.mark.integration
def test_jobs_waiting_with_no_worker_show_a_growing_backlog_until_a_worker_starts(tmp_path_factory):
    cards = write_slow_card(tmp_path_factory.mktemp("backlog-cards"))
    redis_proc, url = start_redis(tmp_path_factory.mktemp("backlog-redis"))
    settings = Settings(redis_url=url, model_cards_dir=cards, models=("slow",), default_model="slow",
                        worker_devices="cpu", worker_concurrency=1, torch_threads=1, max_batch=4,
                        heartbeat_interval_s=1, worker_ttl_s=4, admin_token=TOKEN, metrics_token=TOKEN)
    ARTIFACTS.mkdir(exist_ok=True)
    worker = start_worker(settings, ARTIFACTS / "backlog-worker-1.log", "first")
    web, base = start_web(settings)
    try:
        def queue() -> tuple[dict, dict]:
            """The inference queue as the admin API and as /metrics show it."""
            admin = requests.get(f"{base}/api/v1/admin/queues", headers=AUTH, timeout=10).json()["queues"]
            text = requests.get(f"{base}/metrics", headers=AUTH, timeout=10).text
            parsed = {name: value for (name, labels), value in samples(text).items()
                      if labels == (("queue", "inference.slow"),)}
            return next(q for q in admin if q["name"] == "inference.slow"), parsed

        assert queue()[0]["workers"] == 1
        stop(worker)  # scale to zero: warm shutdown withdraws its child's heartbeat
        wait_for(lambda: queue()[0]["workers"] == 0, 10, "the stopped worker to leave the live set")

        ids = [requests.post(f"{base}/api/v1/jobs", files={"image": ("x.png", images.noise_png(seed), "image/png")},
                             timeout=30).json()["id"] for seed in (71_000, 71_001, 71_002)]
        first, first_metrics = queue()
        assert (first["depth"], first["workers"], first["backlog_per_worker"]) == (3, 0, 3.0)
        assert first_metrics["imgsvc_queue_backlog_per_worker"] == 3 and first_metrics["imgsvc_queue_workers"] == 0
        time.sleep(1.5)
        later, later_metrics = queue()
        assert later["depth"] == 3 and later["oldest_age_s"] >= first["oldest_age_s"] + 1.0  # nothing taken
        assert later_metrics["imgsvc_queue_oldest_age_seconds"] >= first_metrics["imgsvc_queue_oldest_age_seconds"] + 1
        assert all(requests.get(f"{base}/api/v1/jobs/{i}", timeout=10).json()["status"] == "queued" for i in ids)

        worker = start_worker(settings, ARTIFACTS / "backlog-worker-2.log", "second")

        def settled():
            jobs = [requests.get(f"{base}/api/v1/jobs/{i}", timeout=10).json()["status"] for i in ids]
            return jobs if all(status in ("done", "failed") for status in jobs) else None

        assert wait_for(settled, 60, "the new worker to take the waiting jobs", interval=0.2) == ["done"] * 3
        empty, empty_metrics = queue()
        assert (empty["depth"], empty["oldest_age_s"], empty["workers"], empty["backlog_per_worker"]) == (0, None, 1, 0)
        assert empty_metrics["imgsvc_queue_oldest_age_seconds"] == 0
    finally:
        for proc in (web, worker, redis_proc):
            stop(proc)
