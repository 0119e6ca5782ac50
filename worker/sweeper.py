"""Job-level reconciliation: the job record, not the broker message, is the source of truth.

Every computation in flight sits in the ``computations`` sorted set with a deadline. A worker that
claims it pushes the deadline out and names itself owner; finishing removes it. Every
``SWEEP_INTERVAL_S`` one worker (a Redis lock elects it) looks at the computations past their
deadline: one whose owner is still alive gets more time, one whose bytes are still there is
enqueued again (tasks are idempotent, so a duplicate costs a lookup), and one whose bytes expired
fails with ``image_expired``. This catches messages lost between the broker's pop and its unacked
bookkeeping, and messages held by a worker that died, without waiting for the visibility timeout.
"""
from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Celery

from shared.errors import ImageExpired
from shared.keys import COMPUTATIONS_KEY, WORKERS_KEY, Computation
from shared.settings import Settings
from shared.tasks import send_inference
from shared.webhooks import announcing_store

log = logging.getLogger(__name__)
LOCK_KEY = "sweeper:lock"


class Sweeper:
    """Re-enqueue or fail computations stuck past their deadline with no live owner."""

    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery, name: str):
        self.settings, self.client, self.celery, self.name = settings, client, celery, name
        self.store = announcing_store(client, settings, celery)  # failed jobs still get their events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval_s):
            try:
                self.sweep()
            except redis.RedisError:
                log.warning("sweep failed; Redis unreachable", exc_info=True)
            except Exception:  # the sweeper must outlive any one bad round
                log.exception("sweep failed")

    def sweep(self) -> dict[str, int]:
        """Handle every overdue computation once; return how many got each treatment."""
        counts = {"extended": 0, "requeued": 0, "expired": 0, "gone": 0}
        if not self.client.set(LOCK_KEY, self.name, nx=True, ex=self.settings.sweep_interval_s):
            return counts  # another worker sweeps this round
        now = time.time()
        alive = {n.decode() for n in self.client.zrangebyscore(WORKERS_KEY, now - self.settings.worker_ttl_s, "+inf")}
        deadline = now + self.settings.stuck_after_s
        for raw in self.client.zrangebyscore(COMPUTATIONS_KEY, "-inf", now):
            comp = Computation.from_suffix(raw.decode())
            in_flight, owner, has_image = self._state(comp)
            if not in_flight:
                self.client.zrem(COMPUTATIONS_KEY, comp.suffix)
                counts["gone"] += 1
            elif owner in alive:
                self.client.zadd(COMPUTATIONS_KEY, {comp.suffix: deadline})
                counts["extended"] += 1
            elif not has_image:
                self.store.fail(comp, ImageExpired("The uploaded image expired before a worker finished it.").to_dict())
                counts["expired"] += 1
            else:
                send_inference(self.celery, comp)
                self.client.zadd(COMPUTATIONS_KEY, {comp.suffix: deadline})
                log.warning("re-enqueued computation %s: stuck with no live owner", comp.suffix)
                counts["requeued"] += 1
        return counts

    def _state(self, comp: Computation) -> tuple[bool, str | None, bool]:
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(comp.inflight_key)
        pipe.get(comp.owner_key)
        pipe.exists(comp.image_key)
        in_flight, owner, has_image = pipe.execute()
        return bool(in_flight), owner.decode() if owner else None, bool(has_image)
