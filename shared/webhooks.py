"""Webhook events: created when a job (or batch) settles, delivered by the webhook worker.

An event is ``webhook:event:<id>``: its type, endpoint, the exact body every attempt sends, its
state (``pending`` -> ``delivered`` | ``failed`` | ``endpoint_gone``) and attempt count. While it is
pending it sits in the ``webhook:due`` sorted set with the time its next attempt is due; that set,
not a Celery countdown, carries the retry schedule, so a retry a day away costs no worker memory and
survives restarts (Celery's Redis transport would redeliver long-ETA messages every
visibility_timeout). The webhook worker's poller sends each due event to the ``webhooks`` queue.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import redis

from shared.batches import BatchStore
from shared.jobs import JobStore, utc_now
from shared.keys import ANNOUNCE_KEY, WEBHOOK_DUE_KEY, webhook_attempts_key, webhook_event_key, webhook_events_key
from shared.tasks import send_webhook

log = logging.getLogger(__name__)
FINAL_STATES = ("delivered", "failed", "endpoint_gone")
DISPATCH_LEASE_S = 60  # an event sent to the queue is due again after this, in case the message is lost
MAX_ATTEMPT_LOG = 200

# Claim due events: push each one's due time ahead by the lease, so another poller skips it.
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
"""


@dataclasses.dataclass(frozen=True)
class Event:
    """One webhook event as stored."""

    id: str
    type: str
    subject: str  # job:<id> or batch:<id>
    url: str
    owner: str  # API key id whose secret signs it; "" for WEBHOOK_SECRET
    body: bytes
    state: str
    attempts: int
    round_start: int  # attempts made before the latest manual redelivery (the schedule restarts)
    created_at: str
    next_attempt_at: float | None

    def public(self) -> dict:
        next_at = self.next_attempt_at if self.state == "pending" else None
        return {"id": self.id, "type": self.type, "url": self.url, "state": self.state,
                "attempts": self.attempts, "created_at": self.created_at,
                "next_attempt_at": utc_now(next_at) if next_at else None}

    @classmethod
    def from_hash(cls, f: dict[bytes, bytes]) -> "Event":
        s = {k.decode(): v for k, v in f.items()}
        text = {k: v.decode() for k, v in s.items() if k != "body"}
        return cls(id=text["id"], type=text["type"], subject=text["subject"], url=text["url"],
                   owner=text.get("owner", ""), body=s["body"], state=text["state"],
                   attempts=int(text.get("attempts", 0)), round_start=int(text.get("round_start", 0)),
                   created_at=text["created_at"],
                   next_attempt_at=float(text["next_attempt_at"]) if text.get("next_attempt_at") else None)


class EventStore:
    """Redis records of webhook events and their attempts."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis, self.ttl_s = client, ttl_s
        self._claim_due = client.register_script(_CLAIM_DUE)

    def create(self, event_type: str, subject: str, url: str, owner: str, data_json: str) -> str | None:
        """Store the subject's pending event whose body wraps ``data_json``; return its id, or None
        when it already exists.

        A subject (a job or a batch) settles once, so its event id is derived from it: announcing
        twice (a catch-up racing the original announcer) cannot make a second event.
        """
        event_id, now = "msg_" + subject.split(":", 1)[1], utc_now()
        if not self.redis.hsetnx(webhook_event_key(event_id), "id", event_id):
            return None
        body = f'{{"type": {json.dumps(event_type)}, "timestamp": "{now}", "data": {data_json}}}'
        pipe = self.redis.pipeline()
        pipe.hset(webhook_event_key(event_id), mapping={
            "type": event_type, "subject": subject, "url": url, "owner": owner,
            "body": body, "state": "pending", "attempts": 0, "created_at": now})
        pipe.expire(webhook_event_key(event_id), self.ttl_s)
        pipe.rpush(webhook_events_key(subject), event_id)
        pipe.expire(webhook_events_key(subject), self.ttl_s)
        pipe.zadd(WEBHOOK_DUE_KEY, {event_id: time.time() + DISPATCH_LEASE_S})
        pipe.execute()
        return event_id

    def get(self, event_id: str) -> Event | None:
        fields = self.redis.hgetall(webhook_event_key(event_id))
        return Event.from_hash(fields) if fields else None

    def for_subject(self, subject: str) -> list[Event]:
        ids = [i.decode() for i in self.redis.lrange(webhook_events_key(subject), 0, -1)]
        events = [self.get(event_id) for event_id in ids]
        return [e for e in events if e is not None]

    def attempts(self, subject: str) -> list[dict]:
        return [json.loads(a) for a in self.redis.lrange(webhook_attempts_key(subject), 0, -1)]

    def record_attempt(self, event: Event, entry: dict) -> None:
        """Append one attempt to the subject's log and count it on the event."""
        pipe = self.redis.pipeline()
        pipe.rpush(webhook_attempts_key(event.subject), json.dumps(entry))
        pipe.ltrim(webhook_attempts_key(event.subject), -MAX_ATTEMPT_LOG, -1)
        pipe.expire(webhook_attempts_key(event.subject), self.ttl_s)
        pipe.hincrby(webhook_event_key(event.id), "attempts", 1)
        pipe.execute()

    def schedule(self, event_id: str, due: float) -> None:
        """Keep the event pending with its next attempt at ``due``."""
        pipe = self.redis.pipeline()
        pipe.hset(webhook_event_key(event_id), mapping={"state": "pending", "next_attempt_at": due})
        pipe.zadd(WEBHOOK_DUE_KEY, {event_id: due})
        pipe.execute()

    def finalize(self, event_id: str, state: str) -> None:
        """End the event in ``state``; no more attempts unless redelivered."""
        pipe = self.redis.pipeline()
        pipe.hset(webhook_event_key(event_id), "state", state)
        pipe.hdel(webhook_event_key(event_id), "next_attempt_at")
        pipe.zrem(WEBHOOK_DUE_KEY, event_id)
        pipe.execute()

    def reopen(self, event: Event) -> None:
        """Make a settled event pending again (manual redelivery): its retry schedule restarts."""
        self.redis.hset(webhook_event_key(event.id), mapping={"state": "pending", "round_start": event.attempts})
        self.redis.expire(webhook_event_key(event.id), self.ttl_s)
        self.schedule(event.id, time.time() + DISPATCH_LEASE_S)

    def claim_due(self, limit: int = 100) -> list[str]:
        """Take up to ``limit`` due events for dispatch (each is due again after the lease)."""
        now = time.time()
        return [i.decode() for i in self._claim_due(keys=[WEBHOOK_DUE_KEY],
                                                    args=[now, now + DISPATCH_LEASE_S, limit])]


class Announcer:
    """Turns settled jobs into webhook events (job and batch) and hands them to the webhooks queue."""

    def __init__(self, store: JobStore, celery, settings):
        self.jobs, self.celery, self.settings = store, celery, settings
        self.events = EventStore(store.redis, settings.job_ttl_s)
        self.batches = BatchStore(store.redis, store, settings.job_ttl_s)

    def install(self) -> "Announcer":
        """Have the job store call this announcer whenever jobs it marks settled await an event."""
        self.jobs.on_settled = self.jobs_settled
        return self

    def jobs_settled(self, job_ids: list[str]) -> None:
        """Create and send the events the settled jobs call for; never raise into the caller."""
        try:
            self._announce(job_ids)
            self.jobs.redis.zrem(ANNOUNCE_KEY, *job_ids)
        except Exception:  # the job is settled either way; the webhook worker's catch-up retries it
            log.exception("could not announce settled jobs %s", job_ids)

    def catch_up(self, older_than_s: float = 30, limit: int = 100) -> int:
        """Announce jobs settled more than ``older_than_s`` ago whose announcer never finished."""
        stale = self.jobs.redis.zrangebyscore(ANNOUNCE_KEY, "-inf", time.time() - older_than_s, 0, limit)
        if stale:
            log.warning("announcing %d settled jobs their own process did not", len(stale))
            self.jobs_settled([job_id.decode() for job_id in stale])
        return len(stale)

    def _announce(self, job_ids: list[str]) -> None:
        for job_id, read in zip(job_ids, self.jobs.read_many(job_ids)):
            if read is None:
                continue
            fields, job_text = read
            job, owner = json.loads(job_text), fields.get("owner", "")
            if job["callback_url"]:
                kind = "job.completed" if job["status"] == "done" else "job.failed"
                self.dispatch(self.events.create(kind, f"job:{job_id}", job["callback_url"], owner, job_text))
            if job["batch_id"] and self.batches.job_settled(job["batch_id"], job_id):
                self._batch_completed(job["batch_id"])

    def _batch_completed(self, batch_id: str) -> None:
        fields = self.batches.fields(batch_id)
        if fields and fields["callback_url"]:
            batch_text = self.batches.get_json(batch_id)
            self.dispatch(self.events.create("batch.completed", f"batch:{batch_id}", fields["callback_url"],
                                             fields["owner"], batch_text))

    def dispatch(self, event_id: str | None) -> None:
        """Send a new event's first attempt now; if that fails the poller sends it after the lease."""
        if event_id is None:
            return  # announced before: that announcer sent it
        try:
            send_webhook(self.celery, event_id)
        except Exception:
            log.warning("could not queue webhook %s now; the poller will retry", event_id, exc_info=True)


def announcing_store(client: redis.Redis, settings, celery) -> JobStore:
    """Return a JobStore whose settled jobs send their webhook and batch events through ``celery``."""
    store = JobStore.from_settings(client, settings)
    Announcer(store, celery, settings).install()
    return store
