"""kombu's Redis acknowledgement bookkeeping, made to outlive a Redis that refuses writes.

The Celery consumer (each worker's main process) records every message it takes in kombu's
``unacked`` hash, and acknowledges, rejects or requeues it there. When the main Redis is at
``maxmemory`` (``noeviction``) those writes are refused with OOM, kombu raises into the consumer
loop, and Celery exits with "Unrecoverable error: OutOfMemoryError": the worker is gone, and with
``make run`` every process beside it. Here such a refusal is logged once and the write is kept to be
done again, at the next acknowledgement or the next visibility check (both run in the consumer's own
loop, so no thread touches the channel's connection). Nothing is lost meanwhile:

- a message taken whose record was refused is held in memory, raw, until the record is written, or
  it is acknowledged (its work done: nothing to keep), or requeued (pushed back from memory);
- a refused requeue leaves the message in ``unacked``: the requeue is done again later, or kombu's
  visibility-timeout restore delivers it again;
- a refused acknowledgement is done again later; a redelivery meanwhile finds its result written.
"""
from __future__ import annotations

import logging
import time

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger(__name__)
MAX_DEFERRED = 100_000  # bookkeeping kept for later; a consumer holds prefetch-many messages at once


class ResilientQoS(kombu_redis.QoS):
    """kombu's Redis QoS whose refused writes are kept and done again, never raised into the consumer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unrecorded: dict[str, tuple] = {}  # tag -> (raw message, exchange, routing key)
        self._deferred: list[tuple[str, str, bool]] = []  # (what, tag, leftmost): "ack" or "restore"
        self._failing_since: float | None = None

    def append(self, message, delivery_tag):
        self.retry_deferred()
        delivery = message.delivery_info
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                    self.unacked_key, delivery_tag,
                    dumps([message._raw, delivery["exchange"], delivery["routing_key"]])).execute()
        except redis.RedisError as exc:
            self._refused("record a message taken", exc)
            self._unrecorded[delivery_tag] = (message._raw, delivery["exchange"], delivery["routing_key"])
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag):
        self.retry_deferred()
        if self._unrecorded.pop(delivery_tag, None) is None:
            self._try("ack", delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        self.retry_deferred()
        if not requeue:
            self.ack(delivery_tag)
            return
        self._try("restore", delivery_tag, leftmost=True)
        virtual.QoS.ack(self, delivery_tag)

    def restore_visible(self, *args, **kwargs):
        self.retry_deferred()
        try:
            super().restore_visible(*args, **kwargs)
        except redis.RedisError as exc:
            self._refused("restore messages past the visibility timeout", exc)

    def restore_unacked(self, client=None):
        """At shutdown: put back what this consumer holds, those held only in memory included."""
        self.retry_deferred()
        for tag in list(self._delivered):
            self._try("restore", tag)
        self._delivered.clear()

    def retry_deferred(self) -> None:
        """Do again the bookkeeping Redis refused before; keep what it refuses still."""
        if not (self._deferred or self._unrecorded):
            return
        deferred, self._deferred = self._deferred, []
        for what, tag, leftmost in deferred:
            self._try(what, tag, leftmost, again=True)
        for tag, (raw, exchange, key) in list(self._unrecorded.items()):
            if tag not in self._delivered:
                continue  # settled meanwhile: ``ack`` or ``restore`` took care of it
            try:
                with self.pipe_or_acquire() as pipe:
                    pipe.zadd(self.unacked_index_key, {tag: time.time()}).hset(
                        self.unacked_key, tag, dumps([raw, exchange, key])).execute()
                del self._unrecorded[tag]
            except redis.RedisError:
                break
        if not (self._deferred or self._unrecorded) and self._failing_since is not None:
            log.warning("Redis takes the broker's bookkeeping again after %.0f s; nothing was lost",
                        time.time() - self._failing_since)
            self._failing_since = None

    def _try(self, what: str, tag: str, leftmost: bool = False, again: bool = False) -> None:
        try:
            if what == "ack":
                self._remove_from_indices(tag).execute()
            elif tag in self._unrecorded:
                raw, exchange, key = self._unrecorded.pop(tag)
                self._push_back(tag, raw, exchange, key, leftmost)
            else:
                self.restore_by_tag(tag, leftmost=leftmost)
        except redis.RedisError as exc:
            if not again:
                self._refused(f"{what} message {tag}", exc)
            if len(self._deferred) < MAX_DEFERRED:
                self._deferred.append((what, tag, leftmost))

    def _push_back(self, tag: str, raw, exchange: str, key: str, leftmost: bool) -> None:
        try:
            with self.channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                self.channel._do_restore_message(raw, exchange, key, pipe, leftmost)
                pipe.execute()
        except redis.RedisError:
            self._unrecorded[tag] = (raw, exchange, key)  # still only here: tried again later
            raise

    def _refused(self, what: str, exc: Exception) -> None:
        if self._failing_since is None:  # say it once per outage, not once per message
            self._failing_since = time.time()
            log.error("Redis refused to %s (%s); the worker carries on and does it again once Redis "
                      "takes writes (a full main Redis: see docs/operations.md)", what, exc)


def install() -> None:
    """Make every Redis (and Sentinel) channel of this process use ResilientQoS."""
    kombu_redis.Channel.QoS = ResilientQoS
