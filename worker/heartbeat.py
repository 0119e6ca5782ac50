"""Each pool child announces itself in Redis so the web tier (readyz) and admins can see it."""
from __future__ import annotations

import json
import logging
import threading
import time

import redis

from shared.keys import WORKERS_KEY, worker_key

log = logging.getLogger(__name__)


class Heartbeat:
    """Publish ``worker:<name>`` and refresh its score in the ``workers`` set every interval."""

    def __init__(self, client: redis.Redis, name: str, info: dict, *, interval_s: int, ttl_s: int):
        self.client, self.name, self.info = client, name, info
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.counters = {"jobs_done": 0, "jobs_failed": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def count(self, counter: str) -> None:
        self.counters[counter] += 1

    def beat(self) -> None:
        """Publish this child's state once."""
        now = time.time()
        fields = {**{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in self.info.items()},
                  **self.counters, "last_seen": now}
        pipe = self.client.pipeline()
        pipe.hset(worker_key(self.name), mapping=fields)
        pipe.expire(worker_key(self.name), self.ttl_s)
        pipe.zadd(WORKERS_KEY, {self.name: now})
        pipe.zremrangebyscore(WORKERS_KEY, 0, now - self.ttl_s)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError:
                log.warning("heartbeat to Redis failed; retrying in %ss", self.interval_s, exc_info=True)

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
