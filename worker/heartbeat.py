"""Each pool child announces itself in Redis so the web tier (readyz, admin, metrics) can see it.

Fields of ``worker:<host>:<pid>:<boot>``: what the child is (node, host, pid, device and its name, models
with versions, batch sizes) and how it is doing (computations done/failed, jobs failed past their
deadline and computations skipped at claim, current batch size, inference
latency p50/p95 over its last LATENCY_WINDOW images, GPU memory, last seen). The beat also samples
the depth of the child's queues into the per-minute statistics for the admin page's charts.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Callable

import redis

from shared import stats
from shared.keys import WORKERS_KEY, worker_key
from shared.tasks import priority_lists

log = logging.getLogger(__name__)
LATENCY_WINDOW = 200


def child_name() -> str:
    """This child's name in the live set, ``host:pid:boot``.

    A restarted container reuses its hostname and, very likely, its PIDs: the boot part, new at
    every start, keeps a new child from looking like the owner of a dead one's messages and
    computations (which would then wait for the visibility timeout instead of the next sweep).
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Heartbeat:
    """Publish ``worker:<name>`` and refresh its score in the ``workers`` set every interval."""

    def __init__(self, client: redis.Redis, name: str, info: dict, *, interval_s: int, ttl_s: int,
                 probe: Callable[[], dict] | None = None, queues: tuple[str, ...] = ()):
        self.client, self.name, self.info = client, name, info
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.probe, self.queues = probe, queues
        self.counters = {"jobs_done": 0, "jobs_failed": 0, "jobs_deadline_exceeded": 0, "computations_skipped": 0,
                         "current_batch": 0}
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def count(self, counter: str, by: int = 1) -> None:
        self.counters[counter] += by

    def batch_started(self, size: int) -> None:
        """Note the size of the batch now running (0: idle)."""
        self.counters["current_batch"] = size

    def observe(self, inference_s: list[float]) -> None:
        """Add the inference time of each image a batch finished to the rolling window."""
        self.latencies.extend(inference_s)

    def latency_ms(self) -> dict:
        window = list(self.latencies)
        return {q: None if not window else round(stats.percentile(window, p) * 1000, 2)
                for q, p in (("p50", 0.5), ("p95", 0.95))}

    def fields(self, now: float) -> dict:
        """Return the hash fields to publish, nested values as JSON."""
        dynamic = self.probe() if self.probe is not None else {}
        values = {**self.info, **dynamic, **self.counters, "latency_ms": self.latency_ms(), "last_seen": now}
        return {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in values.items()}

    def beat(self) -> None:
        """Publish this child's state once."""
        now = time.time()
        pipe = self.client.pipeline()
        pipe.hset(worker_key(self.name), mapping=self.fields(now))
        pipe.expire(worker_key(self.name), self.ttl_s)
        pipe.zadd(WORKERS_KEY, {self.name: now})
        pipe.zremrangebyscore(WORKERS_KEY, 0, now - self.ttl_s)
        lists = {queue: priority_lists(queue) for queue in self.queues}
        for names in lists.values():
            for name in names:
                pipe.llen(name)
        lengths = iter(pipe.execute()[4:])
        depths = {queue: sum(next(lengths) for _ in names) for queue, names in lists.items()}
        stats.record_queue_depths(self.client, depths, now)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError:
                log.warning("heartbeat to Redis failed; retrying in %ss", self.interval_s, exc_info=True)
            except Exception:  # a failing GPU probe must not silence the heartbeat for good
                log.exception("heartbeat of %s failed; retrying in %ss", self.name, self.interval_s)

    def stop(self) -> None:
        """Stop beating and withdraw this child from the live set."""
        self._stop.set()
        try:
            pipe = self.client.pipeline()
            pipe.zrem(WORKERS_KEY, self.name)
            pipe.delete(worker_key(self.name))
            pipe.execute()
        except redis.RedisError:
            log.warning("could not withdraw worker %s from Redis", self.name, exc_info=True)
