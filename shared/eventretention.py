"""Where a webhook event lives once it is settled (delivered, failed, endpoint gone): as a settled job
does (shared/retention.py), on the cache role for JOB_RESULT_TTL_S, with a short tail on the main server.

An event in flight (pending) and its retry schedule stay on the main server (``noeviction``): they
are work. Once it is settled, its record (the exact body, for a manual redelivery), the subject's
list of events and its attempt log are copied whole to the cache role, and the main server keeps
them MAIN_TAIL_S more. With one server they stay there for JOB_RESULT_TTL_S. A manual redelivery of
a settled event writes it back to the main server whole (EventStore.reopen).
"""
from __future__ import annotations

import logging

import redis

from shared.errors import Unavailable
from shared.retention import MAIN_TAIL_S

log = logging.getLogger(__name__)


class EventRetention:
    """Moves settled events to the cache role and reads them back from wherever they are."""

    def __init__(self, client: redis.Redis, cache: redis.Redis | None, kept_s: int):
        self.redis, self.cache, self.kept_s = client, cache if cache is not client else None, kept_s

    def retire(self, keys: list[str]) -> None:
        """Keep a settled event's keys (its record, its subject's list, its attempt log) for ``kept_s``
        on the cache role, and for MAIN_TAIL_S on the main server. Never raises: the event is settled."""
        try:
            if self.cache is None:
                pipe = self.redis.pipeline(transaction=False)
                for key in keys:
                    pipe.expire(key, self.kept_s)
                pipe.execute()
                return
            self._copy(keys)
        except redis.RedisError as exc:
            log.warning("could not retire settled webhook keys %s; they expire as they were: %s", keys, exc)

    def _copy(self, keys: list[str]) -> None:
        read = self.redis.pipeline(transaction=False)
        for key in keys:
            read.type(key)
        kinds = read.execute()
        for key, kind in zip(keys, kinds):
            if kind == b"hash":
                read.hgetall(key)
            else:
                read.lrange(key, 0, -1)
        values = read.execute()
        # A subject's second event (job.started, then job.completed) settles later: its list and
        # attempt log on the cache role already hold the first one's, so they are added to, not replaced.
        list_keys = [key for key, kind in zip(keys, kinds) if kind == b"list"]
        kept = self.cache.pipeline(transaction=False)
        for key in list_keys:
            kept.lrange(key, 0, -1)
        already = dict(zip(list_keys, kept.execute())) if list_keys else {}
        write = self.cache.pipeline(transaction=False)
        for key, kind, value in zip(keys, kinds, values):
            if not value:
                continue
            if kind == b"hash":
                write.delete(key)
                write.hset(key, mapping=value)
            else:
                fresh = merged([], value, already.get(key, []))
                if fresh:
                    write.rpush(key, *fresh)
            write.expire(key, self.kept_s)
        write.execute()
        tail = self.redis.pipeline(transaction=False)
        for key in keys:
            tail.expire(key, MAIN_TAIL_S)
        tail.execute()

    def hash(self, key: str) -> dict:
        """A record from the main server, or else the cache role."""
        found = self.redis.hgetall(key)
        return found or self._from_cache(lambda c: c.hgetall(key)) or {}

    def list(self, key: str) -> list[bytes]:
        """A subject's list: what the cache role kept of its settled events, then the main server's."""
        found = self.redis.lrange(key, 0, -1)
        kept = self._from_cache(lambda c: c.lrange(key, 0, -1)) or []
        return merged(kept, found)

    def _from_cache(self, read):
        if self.cache is None:
            return None
        try:
            return read(self.cache)
        except redis.RedisError as exc:
            raise Unavailable("Settled webhook events are kept on the cache server, which does not "
                              "answer; retry shortly.", retry_after_s=5) from exc


def merged(older: list, newer: list, already: list = ()) -> list:
    """``older`` then the items of ``newer`` not in ``older`` nor ``already`` (in order)."""
    seen = {*older, *already}
    return list(older) + [item for item in newer if item not in seen]
