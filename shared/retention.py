"""Where a settled job lives, and for how long: the main server holds work in flight, the cache
role holds what is settled.

A job that settles keeps its hash ``job:<id>`` (its answer included) on the main server (REDIS_URL,
``noeviction``) only for a short tail, ``MAIN_TAIL_S``, while the process that settled it copies the
whole hash, every field it has (unknown ones included), to the same key on the cache role
(CACHE_URL, ``allkeys-lru``), kept for JOB_RESULT_TTL_S. A job whose webhook or batch event is not
made yet stays on the main server until it is (the announcer then shortens it to the tail), so that
a cache that evicts cannot lose an event. With one server (no CACHE_URL) the cache role is the main
server: nothing is copied, and the settled hash simply lives there for JOB_RESULT_TTL_S.

Job ids carry the time they were issued (the UUIDv7 layout: 48 bits of unix milliseconds, the
version nibble 7, then random bits), so a well-formed id that is no longer found is told apart from
one this service could not have issued: it is answered ``expired``, not ``not_found``. Reading the
time from the id costs no memory; an id crafted in our format is answered ``expired`` too, which
tells its maker nothing about any job.
"""
from __future__ import annotations

import logging
import secrets
import time

import redis

from shared.keys import job_key

log = logging.getLogger(__name__)

# How long a settled job stays on the main server once its copy is on the cache role: enough for
# the read right after it settles and for an upload racing the copy; short, so that the main server
# holds settled work for seconds, not days (docs/scaling.md).
MAIN_TAIL_S = 10
CLOCK_SKEW_S = 300  # an id issued this far in the future (another host's clock) still counts as issued


def new_job_id() -> str:
    """Return a new job id: 32 hex digits in the UUIDv7 layout, so it tells when it was issued."""
    millis = int(time.time() * 1000) & ((1 << 48) - 1)
    rand = secrets.randbits(74)
    value = (millis << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return f"{value:032x}"


def issued_at(job_id: str) -> float | None:
    """Return when ``job_id`` was issued (unix seconds), or None if this service did not make it
    (an id from before ids carried their time, or one that is malformed or from the future)."""
    if len(job_id) != 32 or job_id[12] != "7" or job_id[16] not in "89ab":
        return None
    try:
        issued = int(job_id[:12], 16) / 1000
    except ValueError:
        return None
    return issued if issued <= time.time() + CLOCK_SKEW_S else None


def copy_settled(cache: redis.Redis, records: list[dict], ttl_s: int) -> None:
    """Copy settled jobs' hashes (whole: every field, known or not) to the cache role for ``ttl_s``.
    A cache that is down loses them there: the main server's tail still answers them for
    MAIN_TAIL_S, then they read as ``expired``."""
    if not records:
        return
    pipe = cache.pipeline(transaction=False)
    for fields in records:
        job_id = fields.get("id") or fields.get(b"id")
        key = job_key(job_id.decode() if isinstance(job_id, bytes) else job_id)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl_s)
    try:
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not copy %d settled jobs to the cache role; they expire from the main "
                    "server in %d s: %s", len(records), MAIN_TAIL_S, exc)


def from_flat(flat: list) -> dict:
    """A hash as HGETALL inside a Lua script returns it (field, value, field, value...) as a dict."""
    return dict(zip(flat[::2], flat[1::2]))
