"""Webhook events: created when a job (or batch) settles, delivered by the webhook worker.

An event is ``webhook:event:<id>``: its type, endpoint, the exact body every attempt sends, its
state (``pending`` -> ``delivered`` | ``failed`` | ``endpoint_gone``) and attempt count. While it is
pending it sits in the ``webhook:due`` sorted set with the time its next attempt is due; that set,
not a Celery countdown, carries the retry schedule, so a retry a day away costs no worker memory and
survives restarts (Celery's Redis transport would redeliver long-ETA messages every
visibility_timeout). The webhook worker's poller sends each due event to the ``webhooks`` queue.

An event is made whole in one transaction or not at all. Sending marks it ``dispatched``; an attempt
begins only by taking that mark and the event's lock together (one script), so a message that
arrives twice, late, or after its attempt already ran finds nothing to take: no attempt runs ahead
of its schedule, and none while another holds the event. The lock and the due time both outlast the
attempt's whole time budget (name lookup included), which the attempt cannot overrun.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import redis

from shared import redisconn
from shared.batches import BatchStore
from shared.eventretention import EventRetention
from shared.jobs import JobStore, job_json, utc_now
from shared.keys import (ANNOUNCE_KEY, STARTED_KEY, WEBHOOK_DUE_KEY, batch_key, job_key, webhook_attempts_key, webhook_event_key, webhook_events_key,
                         webhook_lock_key)
from shared.tasks import send_webhook

log = logging.getLogger(__name__)
FINAL_STATES = ("delivered", "failed", "endpoint_gone")
DISPATCH_LEASE_S = 60  # an event sent to the queue is due again after this, in case the message is lost
MAX_ATTEMPT_LOG = 200
STARTED_TAG = "started"  # a job.started event's id is msg_<job id>_started; its other event's, msg_<job id>

# Claim due events: mark each one dispatched and push its due time ahead by the lease, so another
# poller skips it; an event that expired with its job leaves the schedule.
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, id in ipairs(due) do
  local event = ARGV[4] .. id
  if redis.call('HEXISTS', event, 'state') == 1 then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    redis.call('HSET', event, 'dispatched', '1')
    claimed[#claimed + 1] = id
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
"""

# Begin an attempt: only a pending, dispatched event whose lock is free; take the mark and the lock,
# and keep the poller off it until the lock would have expired.
_BEGIN_ATTEMPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then redis.call('ZREM', KEYS[2], ARGV[1]) return 'expired' end
if state ~= 'pending' then return state end
if redis.call('HGET', KEYS[1], 'dispatched') ~= '1' then return 'not_due' end
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return 'busy' end
redis.call('HDEL', KEYS[1], 'dispatched')
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 'begun'
"""

# End an attempt: log it (when one was made), then, if the lock is still ours, settle or schedule the
# event and let go. A holder whose lock expired only logs: the event is another attempt's now.
_END_ATTEMPT = """
if ARGV[1] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
end
if redis.call('GET', KEYS[4]) ~= ARGV[4] then return 0 end
redis.call('DEL', KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[3], ARGV[7]) return 1 end
redis.call('HDEL', KEYS[1], 'dispatched')
if ARGV[6] == '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[5])
  redis.call('HDEL', KEYS[1], 'next_attempt_at')
  redis.call('ZREM', KEYS[3], ARGV[7])
else
  redis.call('HSET', KEYS[1], 'state', 'pending', 'next_attempt_at', ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7])
end
return 1
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
    traceparent: str = ""  # the job's trace: each attempt is a span in it
    after: str = ""  # an earlier event of the same job (its job.started): this one waits until that one ends

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
                   next_attempt_at=float(text["next_attempt_at"]) if text.get("next_attempt_at") else None,
                   traceparent=text.get("traceparent", ""), after=text.get("after", ""))


class EventStore:
    """Redis records of webhook events and their attempts."""

    def __init__(self, client: redis.Redis, ttl_s: int, cache: redis.Redis | None = None, kept_s: int | None = None):
        self.redis, self.ttl_s = client, ttl_s
        # settled events move to the cache role for ``kept_s`` (shared/eventretention.py)
        self.kept = EventRetention(client, cache, kept_s or ttl_s)
        self._claim_due = client.register_script(_CLAIM_DUE)
        self._begin = client.register_script(_BEGIN_ATTEMPT)
        self._end = client.register_script(_END_ATTEMPT)

    def create(self, event_type: str, subject: str, url: str, owner: str, data_json: str,
               traceparent: str = "", *, tag: str = "", after: str = "") -> str | None:
        """Store the subject's pending event whose body wraps ``data_json``, dispatched for its first
        attempt; return its id, or None when it already exists.

        A subject (a job or a batch) settles once, so its event id is derived from it: announcing
        twice (a catch-up racing the original announcer) cannot make a second event. The event is
        written in one transaction: a crash or a refused write leaves no trace, and the announcer's
        catch-up makes it later. (A hash without ``state`` is what an older, non-atomic version left
        when it died half-way; it is made whole now.) A subject's second kind of event (a job's
        ``job.started``) has its own ``tag`` in its id; ``after`` names the event it must follow.
        """
        event_id, now = "msg_" + subject.split(":", 1)[1] + (f"_{tag}" if tag else ""), utc_now()
        key = webhook_event_key(event_id)
        body = f'{{"type": {json.dumps(event_type)}, "timestamp": "{now}", "data": {data_json}}}'
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.hexists(key, "state"):
                    return None
                pipe.multi()
                pipe.hset(key, mapping={
                    "id": event_id, "type": event_type, "subject": subject, "url": url, "owner": owner,
                    "body": body, "state": "pending", "attempts": 0, "created_at": now, "dispatched": "1",
                    **({"traceparent": traceparent} if traceparent else {}), **({"after": after} if after else {})})
                pipe.expire(key, self.ttl_s)
                pipe.rpush(webhook_events_key(subject), event_id)
                pipe.expire(webhook_events_key(subject), self.ttl_s)
                pipe.zadd(WEBHOOK_DUE_KEY, {event_id: time.time() + DISPATCH_LEASE_S})
                pipe.execute()
            except redis.WatchError:
                return None  # another announcer made it in between
        return event_id

    @classmethod
    def from_settings(cls, client: redis.Redis, settings) -> "EventStore":
        cache = redisconn.client(settings, "cache", socket_timeout=2, socket_connect_timeout=1) \
            if redisconn.split(settings) else None
        return cls(client, settings.job_ttl_s, cache, settings.job_result_ttl_s)

    def get(self, event_id: str) -> Event | None:
        fields = self.kept.hash(webhook_event_key(event_id))
        return Event.from_hash(fields) if fields else None

    def for_subject(self, subject: str) -> list[Event]:
        ids = [i.decode() for i in self.kept.list(webhook_events_key(subject))]
        events = [self.get(event_id) for event_id in ids]
        return [e for e in events if e is not None]

    def attempts(self, subject: str) -> list[dict]:
        return [json.loads(a) for a in self.kept.list(webhook_attempts_key(subject))]

    def begin_attempt(self, event_id: str, token: str, lease_s: float) -> str:
        """Take a dispatched event for one attempt, locked by ``token`` for ``lease_s``; return
        ``begun``, or why not: ``not_due`` (no dispatch waits: a duplicate or late message), ``busy``
        (another attempt holds it), ``expired`` or the final state it is in."""
        now = time.time()
        return self._begin(keys=[webhook_event_key(event_id), WEBHOOK_DUE_KEY, webhook_lock_key(event_id)],
                           args=[event_id, token, int(lease_s * 1000), now + lease_s]).decode()

    def end_attempt(self, event: Event, token: str, entry: dict | None, state: str,
                    due: float | None = None) -> bool:
        """Log the attempt ``entry`` (None: none was made), then, if ``token`` still holds the
        event, end it in ``state`` or, with ``due``, keep it pending until then; return whether it
        held."""
        keys = [webhook_event_key(event.id), webhook_attempts_key(event.subject), WEBHOOK_DUE_KEY,
                webhook_lock_key(event.id)]
        args = [json.dumps(entry) if entry else "", MAX_ATTEMPT_LOG, self.ttl_s, token, state,
                "" if due is None else due, event.id]
        held = bool(self._end(keys=keys, args=args))
        if held and due is None:  # settled: its record and logs leave the main server
            self.kept.retire(keys[:2] + [webhook_events_key(event.subject)])
        return held

    def reopen(self, event: Event) -> None:
        """Make a settled event pending again and dispatched (manual redelivery): its retry schedule
        restarts."""
        due, key = time.time() + DISPATCH_LEASE_S, webhook_event_key(event.id)
        pipe = self.redis.pipeline()
        # whole (every field, unknown ones too): a settled event may be on the cache role alone
        pipe.hset(key, mapping={**self.kept.hash(key), "state": "pending", "round_start": event.attempts,
                                "dispatched": "1", "next_attempt_at": due})
        pipe.expire(key, self.ttl_s)
        for log_key in (webhook_events_key(event.subject), webhook_attempts_key(event.subject)):
            if not self.redis.exists(log_key) and (items := self.kept.list(log_key)):
                pipe.rpush(log_key, *items).expire(log_key, self.ttl_s)
        pipe.zadd(WEBHOOK_DUE_KEY, {event.id: due})
        pipe.execute()

    def claim_due(self, limit: int = 100) -> list[str]:
        """Take up to ``limit`` due events for dispatch (each is due again after the lease)."""
        now = time.time()
        return [i.decode() for i in self._claim_due(keys=[WEBHOOK_DUE_KEY],
                                                    args=[now, now + DISPATCH_LEASE_S, limit,
                                                          webhook_event_key("")])]


class Announcer:
    """Turns settled jobs into webhook events (job and batch) and hands them to the webhooks queue."""

    def __init__(self, store: JobStore, celery, settings):
        self.jobs, self.celery, self.settings = store, celery, settings
        self.events = EventStore(store.redis, settings.job_ttl_s, store.cache if store.split else None,
                                 settings.job_result_ttl_s)
        self.batches = BatchStore(store.redis, store, settings.job_ttl_s)

    def install(self) -> "Announcer":
        """Have the job store call this announcer whenever jobs it marks settled (or claims) await an event."""
        self.jobs.on_settled = self.jobs_settled
        self.jobs.on_started = self.jobs_started
        return self

    def jobs_started(self, job_ids: list[str]) -> None:
        """Create and send the job.started events of claimed jobs; never raise into the caller (the
        worker's claim): the webhook worker's catch-up retries them."""
        try:
            for job_id, read in zip(job_ids, self.jobs.read_many(job_ids)):
                if read is not None:
                    self.dispatch(self._started_event(job_id, read[0]))
            self.jobs.redis.zrem(STARTED_KEY, *job_ids)
        except Exception:
            log.exception("could not announce started jobs %s", job_ids)

    def _started_event(self, job_id: str, fields: dict) -> str | None:
        """Make the job's job.started event (the job as it was when a worker claimed it); None when it exists."""
        running = {k: v for k, v in fields.items() if k not in ("finished_at", "error", "result", "result_key")}
        running["status"] = "running"
        return self.events.create("job.started", f"job:{job_id}", fields["callback_url"], fields.get("owner", ""),
                                  job_json(running, None), fields.get("traceparent", ""), tag=STARTED_TAG)

    def jobs_settled(self, job_ids: list[str]) -> None:
        """Create and send the events the settled jobs call for; never raise into the caller."""
        try:
            self._announce(job_ids)
            pipe = self.jobs.redis.pipeline(transaction=False)
            pipe.zrem(ANNOUNCE_KEY, *job_ids)
            for job_id in job_ids:  # its events hold what they need: the job may leave the main server
                pipe.expire(job_key(job_id), self.jobs.settled_ttl_s)
            pipe.execute()
        except Exception:  # the job is settled either way; the webhook worker's catch-up retries it
            log.exception("could not announce settled jobs %s", job_ids)

    def catch_up(self, older_than_s: float = 30, limit: int = 100) -> int:
        """Announce jobs settled more than ``older_than_s`` ago whose announcer never finished."""
        started = self.jobs.redis.zrangebyscore(STARTED_KEY, "-inf", time.time() - older_than_s, 0, limit)
        if started:
            log.warning("announcing %d started jobs their own process did not", len(started))
            self.jobs_started([job_id.decode() for job_id in started])
        stale = self.jobs.redis.zrangebyscore(ANNOUNCE_KEY, "-inf", time.time() - older_than_s, 0, limit)
        if stale:
            log.warning("announcing %d settled jobs their own process did not", len(stale))
            self.jobs_settled([job_id.decode() for job_id in stale])
        return len(stale) + len(started)

    def _announce(self, job_ids: list[str]) -> None:
        for job_id, read in zip(job_ids, self.jobs.read_many(job_ids)):
            if read is None:
                continue
            fields, job_text = read
            job, owner = json.loads(job_text), fields.get("owner", "")
            events = fields.get("webhook_events", "completed").split(",")
            if job["callback_url"] and "completed" in events:
                after = ""
                if fields.get("announce_started") == "1" and fields.get("started_at"):
                    # its job.started first (made now if its announcer has not yet), so that it is
                    # listed, and delivered, before this one
                    self.dispatch(self._started_event(job_id, fields))
                    after = f"msg_{job_id}_{STARTED_TAG}"
                kind = {"done": "job.completed", "canceled": "job.canceled"}.get(job["status"], "job.failed")
                self.dispatch(self.events.create(kind, f"job:{job_id}", job["callback_url"], owner, job_text,
                                                 fields.get("traceparent", ""), after=after))
            batch_id = job["batch_id"]
            # A job counted before is an announcer that died after counting (the catch-up retries it):
            # a finished batch then still needs its event. Creating it twice makes one event.
            if batch_id and (self.batches.job_settled(batch_id, job_id)
                             or self.jobs.redis.hexists(batch_key(batch_id), "finished_at")):
                self._batch_completed(batch_id)

    def _batch_completed(self, batch_id: str) -> None:
        fields = self.batches.fields(batch_id)
        if fields and fields["callback_url"]:
            batch_text = self.batches.get_json(batch_id)
            self.dispatch(self.events.create("batch.completed", f"batch:{batch_id}", fields["callback_url"],
                                             fields["owner"], batch_text))
        if fields:  # opened, finished and announced: its record may leave the main server
            self.batches.retire(batch_id)

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
