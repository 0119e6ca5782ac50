"""One delivery attempt of a webhook event, and what happens next: done, retry later, or stop."""
from __future__ import annotations

import collections
import logging
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from shared import tracing
from shared.jobs import utc_now
from shared.keys import webhook_event_key, webhook_gone_key
from shared.netguard import RefusedUrl, Target, resolve
from shared.settings import Settings
from shared.signing import derive_secret, sign
from shared.webhooks import Event, EventStore
from webhooks.http import Answer, ms_since, post

log = logging.getLogger(__name__)
JITTER = 0.1  # each retry delay is spread by up to +-10% so failed receivers are not hit in lockstep
MAX_RETRY_AFTER_S = 24 * 3600
USER_AGENT = "imgsvc-webhooks/1"
LEASE_MARGIN_S = 30
ORDER_RECHECK_S = 1.0  # an event waiting for its job's earlier one looks again this long after that one is due


class LookupTimeout(Exception):
    """The callback's host name did not resolve within the attempt's time budget."""


class Deliverer:
    """Makes attempts for the webhook worker; all state lives in Redis (EventStore)."""

    def __init__(self, settings: Settings, client: redis.Redis):
        self.settings, self.redis = settings, client
        self.events = EventStore.from_settings(client, settings)
        self.outcomes: collections.Counter[str] = collections.Counter()  # for this worker's heartbeat
        self._lock = threading.Lock()
        # An attempt holds its event this long: its whole time budget and then some for the Redis writes
        # after it; the attempt cannot overrun its budget, so its lock cannot expire while it sends.
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self._lookups = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook-lookup")

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
        token = secrets.token_hex(8)
        begun = self.events.begin_attempt(event_id, token, self.lease_s)
        if begun != "begun":
            return begun  # nothing dispatched (a duplicate or late message), held by another attempt, or settled
        fields = self.redis.hgetall(webhook_event_key(event_id))
        try:
            event = Event.from_hash(fields)
        except (KeyError, ValueError):  # a record no version of ours writes: it can never be sent
            log.exception("webhook event %s is unreadable; giving it up: %r", event_id, sorted(fields))
            subject = fields.get(b"subject", b"").decode() or "event:" + event_id
            unreadable = Event(event_id, "", subject, "", "", b"", "pending", 0, 0, "", None)
            self.events.end_attempt(unreadable, token, None, "failed")
            return "failed"
        return self._attempt(event, token)

    def _attempt(self, event: Event, token: str) -> str:
        if event.after and (due := self._earlier_pending(event.after)) is not None:
            self.events.end_attempt(event, token, None, "pending", due)  # no attempt made: nothing logged
            return "waiting_for_earlier"
        if self.redis.exists(webhook_gone_key(event.url)):
            self.events.end_attempt(event, token, None, "endpoint_gone")
            return "endpoint_gone"
        number = event.attempts + 1
        with tracing.span("webhook attempt", parent=event.traceparent or None,
                          attributes={"webhook.event_id": event.id, "webhook.attempt": number}) as attempt:
            answer = self._send(event, tracing.traceparent_of(attempt))
            if attempt is not None:
                attempt.set_attribute("http.response.status_code", answer.status or 0)
        entry = {"event_id": event.id, "attempt": number, "at": utc_now(), "url": event.url,
                 "status_code": answer.status, "duration_ms": answer.duration_ms, "error": answer.error,
                 "ok": answer.ok}
        if answer.ok:
            outcome, due = "delivered", None
        elif answer.status == 410:
            self.redis.set(webhook_gone_key(event.url), "1", ex=self.settings.job_ttl_s)
            outcome, due = "endpoint_gone", None
        elif (delay := self.next_delay(number - event.round_start, answer)) is None:
            log.warning("webhook %s to %s failed for good after %d attempts", event.id, event.url, number)
            outcome, due = "failed", None
        else:
            outcome, due = "retrying", time.time() + delay
        if not self.events.end_attempt(event, token, entry, outcome, due):
            log.warning("webhook %s: attempt %d outlived its lease; logged, the schedule left to the next",
                        event.id, number)
        return outcome

    def _earlier_pending(self, earlier_id: str) -> float | None:
        """When the event that must go first (a job's job.started) is still pending, return when to
        look again (just after its next attempt is due); None once it is delivered or given up."""
        state, next_at = self.redis.hmget(webhook_event_key(earlier_id), "state", "next_attempt_at")
        if state != b"pending":
            return None
        return max(time.time(), float(next_at or 0)) + ORDER_RECHECK_S

    def next_delay(self, attempts_this_round: int, answer: Answer) -> float | None:
        """Seconds until the next attempt, or None when the schedule is used up."""
        schedule = self.settings.webhook_retry_schedule
        if attempts_this_round > len(schedule):
            return None
        delay = schedule[attempts_this_round - 1] * random.uniform(1 - JITTER, 1 + JITTER)
        if answer.retry_after_s is not None and answer.status in (429, 503):
            delay = min(answer.retry_after_s, MAX_RETRY_AFTER_S)  # the receiver said when
        return delay

    def _send(self, event: Event, traceparent: str = "") -> Answer:
        """Make the attempt within WEBHOOK_TIMEOUT_S, name lookup included; never raise: whatever
        goes wrong is the attempt's error, logged, and retried on the schedule. ``traceparent``:
        the attempt's span, sent for the receiver's own trace."""
        started = time.monotonic()
        deadline = started + self.settings.webhook_timeout_s
        try:
            target = self._resolve(event.url, deadline)
            secret = self._secret(event.owner)
            if secret is None:
                return Answer(None, ms_since(started), "no signing secret is configured (SECRET_KEY / WEBHOOK_SECRET)")
            timestamp = int(time.time())
            headers = {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": event.id,
                       "webhook-timestamp": str(timestamp),
                       "webhook-signature": sign(secret, event.id, timestamp, event.body)}
            if traceparent:
                headers["traceparent"] = traceparent
            return post(target, event.body, headers, connect_timeout=self.settings.webhook_connect_timeout_s,
                        started=started, deadline=deadline)
        except RefusedUrl as exc:  # checked at submit; DNS may have changed since
            return Answer(None, ms_since(started), f"refused: {exc}")
        except LookupTimeout as exc:
            return Answer(None, ms_since(started), f"timed out: {exc}")
        except Exception as exc:  # a URL or body the HTTP library cannot send, or a bug of ours
            log.exception("webhook %s: the attempt to %s raised", event.id, event.url)
            return Answer(None, ms_since(started), f"could not send the request: {type(exc).__name__}: {exc}"[:300])

    def _resolve(self, url: str, deadline: float) -> Target:
        """Check and resolve ``url`` by the deadline; the lookup runs on its own thread, since
        getaddrinfo cannot be interrupted (a lookup still running later finishes there, unused)."""
        lookup = self._lookups.submit(resolve, url, self.settings.webhook_allow_private)
        try:
            return lookup.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            lookup.cancel()
            raise LookupTimeout(f"the host name did not resolve within {self.settings.webhook_timeout_s:g} s") from None

    def _secret(self, owner: str) -> str | None:
        if owner:
            return derive_secret(self.settings.secret_key, owner) if self.settings.secret_key else None
        return self.settings.webhook_secret or None
