"""One delivery attempt of a webhook event, and what happens next: done, retry later, or stop."""
from __future__ import annotations

import collections
import logging
import random
import threading
import time

import redis

from shared.jobs import utc_now
from shared.keys import webhook_gone_key, webhook_lock_key
from shared.netguard import RefusedUrl, resolve
from shared.settings import Settings
from shared.signing import derive_secret, sign
from shared.webhooks import FINAL_STATES, Event, EventStore
from webhooks.http import Answer, post

log = logging.getLogger(__name__)
JITTER = 0.1  # each retry delay is spread by up to +-10% so failed receivers are not hit in lockstep
MAX_RETRY_AFTER_S = 24 * 3600
USER_AGENT = "imgsvc-webhooks/1"


class Deliverer:
    """Makes attempts for the webhook worker; all state lives in Redis (EventStore)."""

    def __init__(self, settings: Settings, client: redis.Redis):
        self.settings, self.redis = settings, client
        self.events = EventStore(client, settings.job_ttl_s)
        self.outcomes: collections.Counter[str] = collections.Counter()  # for this worker's heartbeat
        self._lock = threading.Lock()

    def attempt(self, event_id: str) -> str:
        """Try the event once unless another attempt holds it; return what became of it."""
        outcome = self._attempt_once(event_id)
        with self._lock:
            self.outcomes[outcome] += 1
        return outcome

    def outcome_counts(self) -> dict[str, int]:
        """Return how many attempts ended each way so far (a copy, safe to read from another thread)."""
        with self._lock:
            return dict(self.outcomes)

    def _attempt_once(self, event_id: str) -> str:
        lock = webhook_lock_key(event_id)
        if not self.redis.set(lock, "1", nx=True, ex=int(self.settings.webhook_timeout_s) + 30):
            return "busy"
        try:
            event = self.events.get(event_id)
            if event is None:
                self.events.finalize(event_id, "failed")  # expired with its job: drop it from the schedule
                return "expired"
            if event.state in FINAL_STATES:
                return event.state
            return self._attempt(event)
        finally:
            self.redis.delete(lock)

    def _attempt(self, event: Event) -> str:
        if self.redis.exists(webhook_gone_key(event.url)):
            self.events.finalize(event.id, "endpoint_gone")
            return "endpoint_gone"
        answer = self._send(event)
        number = event.attempts + 1
        self.events.record_attempt(event, {
            "event_id": event.id, "attempt": number, "at": utc_now(),
            "url": event.url, "status_code": answer.status, "duration_ms": answer.duration_ms,
            "error": answer.error, "ok": answer.ok})
        if answer.ok:
            self.events.finalize(event.id, "delivered")
            return "delivered"
        if answer.status == 410:
            self.redis.set(webhook_gone_key(event.url), "1", ex=self.settings.job_ttl_s)
            self.events.finalize(event.id, "endpoint_gone")
            return "endpoint_gone"
        delay = self.next_delay(number - event.round_start, answer)
        if delay is None:
            log.warning("webhook %s to %s failed for good after %d attempts", event.id, event.url, number)
            self.events.finalize(event.id, "failed")
            return "failed"
        self.events.schedule(event.id, time.time() + delay)
        return "retrying"

    def next_delay(self, attempts_this_round: int, answer: Answer) -> float | None:
        """Seconds until the next attempt, or None when the schedule is used up."""
        schedule = self.settings.webhook_retry_schedule
        if attempts_this_round > len(schedule):
            return None
        delay = schedule[attempts_this_round - 1] * random.uniform(1 - JITTER, 1 + JITTER)
        if answer.retry_after_s is not None and answer.status in (429, 503):
            delay = min(answer.retry_after_s, MAX_RETRY_AFTER_S)  # the receiver said when
        return delay

    def _send(self, event: Event) -> Answer:
        try:
            target = resolve(event.url, allow_private=self.settings.webhook_allow_private)
        except RefusedUrl as exc:  # checked at submit; DNS may have changed since
            return Answer(None, 0.0, f"refused: {exc}")
        secret = self._secret(event.owner)
        if secret is None:
            return Answer(None, 0.0, "no signing secret is configured (SECRET_KEY / WEBHOOK_SECRET)")
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": event.id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(secret, event.id, timestamp, event.body)}
        return post(target, event.body, headers, connect_timeout=self.settings.webhook_connect_timeout_s,
                    total_timeout=self.settings.webhook_timeout_s)

    def _secret(self, owner: str) -> str | None:
        if owner:
            return derive_secret(self.settings.secret_key, owner) if self.settings.secret_key else None
        return self.settings.webhook_secret or None
