"""Job-level reconciliation: the job record, not the broker message, is the source of truth.

Every computation in flight sits in the ``computations`` sorted set with a deadline. A worker that
claims it pushes the deadline out and names itself owner; finishing removes it. Every
``SWEEP_INTERVAL_S`` one worker (a Redis lock elects it) looks at every computation in flight:

- its owner's heartbeat stopped (a child that died mid-batch): the messages the dead child had
  taken (``taken_by``) go back on their queue, and a computation whose message is then in no
  queue (Celery's own delivery to a child of a worker that died whole) is enqueued again now, not
  after the visibility timeout brings its message back (that late copy then finds the result
  written). One crash, one message back, one attempt: never a second copy beside the first;
- past its deadline with a live owner: more time;
- past its deadline, its message still waiting in the queue, or taken from it moments ago (a
  backlog, not a loss): more time, and no second message, no attempt counted;
- past its deadline and its message nowhere (lost between a pop and its bookkeeping): enqueued
  again if its bytes are there, else failed with ``image_expired``; but first its queued jobs past
  their own deadline (``deadline_s``) fail ``deadline_exceeded``, and one no job waits for any more
  is released, not sent.

Enqueuing again is safe: tasks are idempotent, so a duplicate costs a lookup.

Each round also counts again the bytes of uploads waiting for workers (``queued:bytes``, what
MAX_QUEUED_MB bounds) from the uploads really in Redis, so no bookkeeping slip can leave the
service refusing uploads for good.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from typing import NamedTuple

import redis
from celery import Celery

from shared.errors import ImageExpired
from shared.jobscripts import RECONCILE_QUEUED_BYTES, RECONCILE_QUEUED_SHARES
from shared.keys import (COMPUTATIONS_KEY, QUEUED_BYTES_KEY, QUEUED_KEYS_KEY, QUEUED_SHARES_KEY, QUEUED_SIZES_KEY,
                         TAKEN_BY_KEY, WORKERS_KEY, Computation)
from shared.settings import Settings
from shared.tasks import INFER_TASK, inference_queue, priority_lists, send_inference
from shared.webhooks import announcing_store
from worker.broker import restore_taken_by

log = logging.getLogger(__name__)
LOCK_KEY = "sweeper:lock"
IMAGE_PREFIX = "image:"  # Computation.image_key: an upload waiting for a worker


class Sweeper:
    """Re-enqueue or fail computations stuck past their deadline with no live owner."""

    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery, name: str,
                 queues: tuple[str, ...] = ()):
        self.settings, self.client, self.celery, self.name = settings, client, celery, name
        self.catalog_queues = queues  # the inference queues whose waiting messages count as a backlog
        self.store = announcing_store(client, settings, celery)  # failed jobs still get their events
        self._reconcile = client.register_script(RECONCILE_QUEUED_BYTES)
        self._reconcile_shares = client.register_script(RECONCILE_QUEUED_SHARES)
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
        """Handle every computation in flight once; return how many got each treatment."""
        counts = {"extended": 0, "waiting": 0, "requeued": 0, "orphaned": 0, "expired": 0, "gone": 0,
                  "restored": 0, "unwaited": 0}
        if not self.client.set(LOCK_KEY, self.name, nx=True, ex=self.settings.sweep_interval_s):
            return counts  # another worker sweeps this round
        now = time.time()
        alive = {n.decode() for n in self.client.zrangebyscore(WORKERS_KEY, now - self.settings.worker_ttl_s, "+inf")}
        takers = {owner.decode() for owner in self.client.hvals(TAKEN_BY_KEY)}
        counts["restored"] = restore_taken_by(self.client, takers - alive) if takers - alive else 0
        entries = [(Computation.from_suffix(raw.decode()), score)
                   for raw, score in self.client.zrange(COMPUTATIONS_KEY, 0, -1, withscores=True)]
        states = self._states([comp for comp, _ in entries])
        queues = {*self.catalog_queues, *(inference_queue(comp.model) for comp, _ in entries)}
        queued = None  # suffixes whose message waits in a queue or the unacked set, read when needed
        for (comp, due), (in_flight, owner, has_image) in zip(entries, states):
            if not in_flight:
                self.client.zrem(COMPUTATIONS_KEY, comp.suffix)
                treatment = "gone"
            elif owner is not None and owner not in alive:
                queued = self._waiting_messages(queues, now) if queued is None else queued
                treatment = self._orphaned(comp, has_image, now, queued)
            elif due > now:
                continue
            elif owner is not None:
                treatment = self._extend(comp, now, "extended")
            else:
                queued = self._waiting_messages(queues, now) if queued is None else queued
                treatment = (self._extend(comp, now, "waiting") if comp.suffix in queued.recent
                             else self._enqueue_again(comp, has_image, now, "requeued"))
            counts[treatment] += 1
        self._reconcile_queued_bytes()
        return counts

    def _orphaned(self, comp: Computation, has_image: bool, now: float, queued: "Waiting") -> str:
        """A computation whose owner died: its one message goes back, never a second beside it."""
        self.client.delete(comp.owner_key)  # once: the next sweep sees it queued again
        if comp.suffix in queued.in_queues:  # put back by restore_taken_by, or by Celery's own reject
            log.warning("computation %s: its worker died; its message is back in its queue", comp.suffix)
            return self._extend(comp, now, "orphaned")
        return self._enqueue_again(comp, has_image, now, "orphaned")

    def _reconcile_queued_bytes(self) -> None:
        before, now = self._reconcile(keys=[QUEUED_BYTES_KEY, QUEUED_SIZES_KEY], args=[IMAGE_PREFIX])
        if before != now:
            log.warning("queued:bytes counted %d bytes of uploads waiting; %d really wait", before, now)
        before, now = self._reconcile_shares(keys=[QUEUED_KEYS_KEY, QUEUED_SHARES_KEY, COMPUTATIONS_KEY])
        if before != now:
            log.warning("queued:shares counted %d computations in flight; %d really are", before, now)

    def _extend(self, comp: Computation, now: float, treatment: str) -> str:
        self.client.zadd(COMPUTATIONS_KEY, {comp.suffix: now + self.settings.stuck_after_s})
        return treatment

    def _enqueue_again(self, comp: Computation, has_image: bool, now: float, treatment: str) -> str:
        """Send the computation's task again, or fail its jobs when its bytes are gone; one whose jobs
        all passed their deadline (or were canceled) is not sent: they fail ``deadline_exceeded``."""
        if self.store.drop_unwaited(comp):
            log.info("computation %s: no job waits for it any more; not sent again", comp.suffix)
            return "unwaited"
        if not has_image:
            self.store.fail(comp, ImageExpired("The uploaded image expired before a worker finished it.").to_dict())
            return "expired"
        send_inference(self.celery, comp)
        log.warning("re-enqueued computation %s: %s", comp.suffix,
                    "its worker died" if treatment == "orphaned" else "its message was lost")
        return self._extend(comp, now, treatment)

    def _states(self, comps: list[Computation]) -> list[tuple[bool, str | None, bool]]:
        """Whether each computation still has jobs waiting, its owner, and whether its bytes are there."""
        pipe = self.client.pipeline(transaction=False)
        for comp in comps:
            pipe.exists(comp.attached_key).get(comp.owner_key).exists(comp.image_key)
        replies = pipe.execute()
        return [(bool(replies[i]), replies[i + 1].decode() if replies[i + 1] else None, bool(replies[i + 2]))
                for i in range(0, len(replies), 3)]

    def _waiting_messages(self, queues: set[str], now: float) -> "Waiting":
        """The computations whose inference message waits in a queue, or was taken from it lately.

        A message a live child takes is claimed (it gets an owner) within milliseconds; one that sat
        unacknowledged and unclaimed for ``STUCK_AFTER_S`` was taken by a process that died, and
        would come back only at the visibility timeout: it does not count as waiting.
        """
        pipe = self.client.pipeline(transaction=False)
        for queue in sorted(queues):
            for name in priority_lists(queue):
                pipe.lrange(name, 0, -1)
        pipe.zrangebyscore("unacked_index", now - self.settings.stuck_after_s, "+inf")
        *lists, recent_tags = pipe.execute()
        in_queues = {suffix for raw in (m for reply in lists for m in reply) if (suffix := _message_suffix(raw))}
        taken = [m for m in self.client.hmget("unacked", recent_tags) if m] if recent_tags else []
        return Waiting(in_queues, in_queues | {suffix for raw in taken if (suffix := _message_suffix(raw))})


class Waiting(NamedTuple):
    """Computations whose message is in a queue list, and those plus the ones taken from it lately."""

    in_queues: set[str]
    recent: set[str]


def _message_suffix(raw: bytes) -> str | None:
    """The computation an inference message names (in a queue, or kombu's unacked [message, ...])."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):
            message = message[0]
        if message.get("headers", {}).get("task") != INFER_TASK:
            return None
        payload = json.loads(base64.b64decode(message["body"]))[0][0]
        return Computation.from_message(payload).suffix
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
