"""Jobs whose image comes by URL (``image_url``): written ``queued`` before their image exists.

The web tier writes the job with its ``image_url`` and a ``fetch`` mark and sends the download to the
fetches queue; the webhook worker downloads the image and then submits it under the same job id
(JobStore.submit: cache, single-flight, batching), or ends the job ``failed`` with ``fetch_failed``.
The ``fetch`` mark is what makes a redelivered download message harmless: only a job that still
carries it is fetched, joined or failed.
"""
from __future__ import annotations

import json

from shared.jobs import JobStore, utc_now
from shared.retention import copy_settled, from_flat
from shared.jobtypes import JobContext
from shared.keys import ANNOUNCE_KEY, job_key, notify_key

# KEYS: job, notify, announce. ARGV: job id, now, error JSON, how long a settled job stays here, how
# long one whose events are not made yet stays. Fail a job still waiting for its image; wake its
# waiters, list it for its events and shorten its life on this server as FINISH does. Returns the
# settled hash (for the cache role), or 0 when the job was not waiting for its image any more.
_FAIL_FETCH = """
if redis.call('HGET', KEYS[1], 'fetch') ~= '1' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[2], 'error', ARGV[3])
redis.call('HDEL', KEYS[1], 'fetch')
redis.call('RPUSH', KEYS[2], 'failed')
redis.call('EXPIRE', KEYS[2], 60)
local awaited = redis.call('HGET', KEYS[1], 'announce') == '1'
if awaited then
  redis.call('ZADD', KEYS[3], redis.call('TIME')[1], ARGV[1])
end
redis.call('EXPIRE', KEYS[1], awaited and ARGV[5] or ARGV[4])
return redis.call('HGETALL', KEYS[1])
"""


class FetchStore:
    """The records of jobs waiting for their image to be downloaded."""

    def __init__(self, store: JobStore):
        self.store, self.redis, self.job_ttl_s = store, store.redis, store.job_ttl_s
        self._fail = self.redis.register_script(_FAIL_FETCH)

    def create(self, job_id: str, url: str, model_info: dict, options: dict, context: JobContext) -> dict[str, str]:
        """Write the job ``queued``, waiting for its image; return the fields written."""
        fields = {"id": job_id, "status": "queued", "cached": "0", "created_at": utc_now(), "image": "null",
                  "model": json.dumps(model_info), "options": json.dumps(options), "image_url": url, "fetch": "1",
                  **context.fields()}
        pipe = self.redis.pipeline()  # one transaction: the job whole or not at all
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.expire(job_key(job_id), self.job_ttl_s)
        pipe.execute()
        return fields

    def pending(self, job_id: str) -> dict[str, str] | None:
        """Return the job's fields while it still waits for its image; None once joined, failed or gone."""
        fields = {k.decode(): v.decode() for k, v in self.redis.hgetall(job_key(job_id)).items()}
        return fields if fields.get("fetch") == "1" else None

    def joined(self, job_id: str, created_at: str, done: bool) -> None:
        """Mark the job's image submitted (a redelivered download message leaves it alone), and keep
        the time it was accepted, not the time its image was submitted. A job ``done`` at once (a
        cache hit) wakes its waiters here, as FINISH wakes those of a computed one."""
        pipe = self.redis.pipeline()
        pipe.hdel(job_key(job_id), "fetch")
        pipe.hset(job_key(job_id), "created_at", created_at)
        if done:
            pipe.rpush(notify_key(job_id), "done")
            pipe.expire(notify_key(job_id), 60)
        pipe.execute()

    def fail(self, job_id: str, error: dict) -> bool:
        """End a job still waiting for its image ``failed`` with ``error``; return whether it did. The
        settled job moves to the cache role like any other (shared/retention.py)."""
        record = self._fail(keys=[job_key(job_id), notify_key(job_id), ANNOUNCE_KEY],
                            args=[job_id, utc_now(), json.dumps(error), self.store.settled_ttl_s, self.job_ttl_s])
        if not record:
            return False
        if self.store.split:
            copy_settled(self.store.cache, [from_flat(record)], self.store.job_result_ttl_s)
        return True
