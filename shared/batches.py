"""Batches: several jobs submitted together, finished together (``batch.completed``).

``batch:<id>`` holds the job ids and a count of jobs still unsettled; each job counts once (the set
``batch:<id>:settled`` guards against a settle seen twice), and the job that brings the count to
zero completes the batch.

A batch is recorded (in one step) before its jobs are submitted, so none can settle unseen, but
``opening``: nobody sees it, and it sends no event, until every job is in and ``open`` is called. A
request that fails half-way discards the batch and the jobs it made; one that dies, or whose Redis
fails too, leaves an invisible batch that expires.
"""
from __future__ import annotations

import json
import logging
import secrets

import redis

from shared.errors import IdempotencyInProgress, Unavailable
from shared.eventretention import EventRetention
from shared.jobs import JobStore, utc_now
from shared.jobtypes import KeyRecord
from shared.keys import ANNOUNCE_KEY, batch_key, batch_settled_key, job_key
from shared.retention import MAIN_TAIL_S

log = logging.getLogger(__name__)

_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return -1 end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
local remaining = redis.call('HINCRBY', KEYS[1], 'remaining', -1)
if remaining == 0 then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  if redis.call('HEXISTS', KEYS[1], 'opening') == 1 then return -2 end  -- open() announces it
end
return remaining
"""

# Make the batch visible; 1 when all its jobs settled while it was opening (announce it now: the
# job named is listed for the announcer's catch-up, in case this process dies first), -1 when gone.
# Show the batch; with an Idempotency-Key (KEYS[3]), store its answer (ARGV[3]) over the request's
# claim (ARGV[2]) in the same step, or change nothing when another request holds the key by now.
_OPEN = """
if KEYS[3] ~= '-' and redis.call('GET', KEYS[3]) ~= ARGV[2] then return -2 end
if redis.call('HDEL', KEYS[1], 'opening') == 0 then return -1 end
if KEYS[3] ~= '-' then redis.call('SET', KEYS[3], ARGV[3], 'EX', tonumber(ARGV[4])) end
if redis.call('HEXISTS', KEYS[1], 'finished_at') == 0 then return 0 end
redis.call('ZADD', KEYS[2], redis.call('TIME')[1], ARGV[1])
return 1
"""


def new_batch_id() -> str:
    return "b" + secrets.token_hex(15)


class BatchStore:
    """Create batches, count their jobs as they settle, and read them back as JSON."""

    def __init__(self, client: redis.Redis, jobs: JobStore, ttl_s: int):
        self.redis, self.jobs, self.ttl_s = client, jobs, ttl_s
        # a finished batch moves to the cache role, as settled jobs do (shared/eventretention.py)
        self.kept = EventRetention(client, jobs.cache if jobs.split else None, jobs.job_result_ttl_s)
        self._settle = client.register_script(_SETTLE)
        self._open = client.register_script(_OPEN)

    def create(self, batch_id: str, job_ids: list[str], owner: str, callback_url: str | None) -> None:
        """Record the batch, opening (invisible), before its jobs are submitted, so none can settle unseen."""
        pipe = self.redis.pipeline(transaction=True)  # the record and its expiry, or nothing
        pipe.hset(batch_key(batch_id), mapping={
            "id": batch_id, "owner": owner, "created_at": utc_now(), "callback_url": callback_url or "",
            "job_ids": json.dumps(job_ids), "total": len(job_ids), "remaining": len(job_ids), "opening": "1"})
        pipe.expire(batch_key(batch_id), self.ttl_s)
        pipe.execute()

    def open(self, batch_id: str, job_ids: list[str], key: KeyRecord | None = None) -> bool:
        """Show the batch once every job is submitted, and store its Idempotency-Key's answer (``key``,
        its ``queued`` answer) in the same step; return True when it already finished (the caller
        announces it, since the settle that finished it could not while it was opening)."""
        opened = self._open(keys=[batch_key(batch_id), ANNOUNCE_KEY, key.name if key else "-"],
                            args=[job_ids[0], *((key.claim, key.queued, key.ttl_s) if key else ("", "", 0))])
        if opened == -1:
            raise Unavailable(f"The record of batch {batch_id} was lost while its jobs were submitted; retry.")
        if opened == -2:
            raise IdempotencyInProgress("Another request holds this Idempotency-Key (this one's claim ran out, "
                                        "IDEMPOTENCY_LEASE_S); retry shortly.", retry_after_s=1)
        return opened == 1

    def discard(self, batch_id: str, job_ids: list[str]) -> None:
        """Remove a batch that could not be made whole, and the jobs it made (no caller has their ids)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(batch_key(batch_id), batch_settled_key(batch_id), *map(job_key, job_ids))
        pipe.zrem(ANNOUNCE_KEY, *job_ids)
        pipe.execute()

    def job_settled(self, batch_id: str, job_id: str) -> bool:
        """Count ``job_id`` as settled; return True when it was the batch's last one."""
        remaining = self._settle(keys=[batch_key(batch_id), batch_settled_key(batch_id)],
                                 args=[job_id, utc_now(), self.ttl_s])
        return remaining == 0

    def retire(self, batch_id: str) -> None:
        """A finished batch whose event is made: its record leaves the main server (JOB_RESULT_TTL_S on
        the cache role); the set that counted its jobs is no longer needed."""
        self.kept.retire([batch_key(batch_id)])
        try:
            self.redis.expire(batch_settled_key(batch_id), MAIN_TAIL_S)
        except redis.RedisError as exc:
            log.warning("could not shorten %s: %s", batch_settled_key(batch_id), exc)

    def fields(self, batch_id: str, owner: str | None = None) -> dict[str, str] | None:
        raw = self.kept.hash(batch_key(batch_id))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if not fields or "opening" in fields or (owner is not None and fields["owner"] != owner):
            return None
        return fields

    def get_json(self, batch_id: str, owner: str | None = None) -> str | None:
        """Return the batch and every job in it as JSON text, or None when unknown or not ``owner``'s."""
        fields = self.fields(batch_id, owner)
        if fields is None:
            return None
        job_ids = json.loads(fields["job_ids"])
        jobs = [job for job in self.jobs.get_many_json(job_ids) if job is not None]
        counts = {"total": len(job_ids), "queued": 0, "running": 0, "done": 0, "failed": 0, "canceled": 0}
        for job in jobs:
            counts[json.loads(job)["status"]] += 1
        head = json.dumps({
            "id": fields["id"], "status": "done" if fields.get("finished_at") else "running",
            "created_at": fields["created_at"], "finished_at": fields.get("finished_at"),
            "callback_url": fields["callback_url"] or None, "counts": counts})
        return f'{head[:-1]}, "jobs": [{", ".join(jobs)}]}}'
