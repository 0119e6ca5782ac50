"""The small values JobStore takes and returns (shared/jobs.py): what a claim found, who submitted a
job, and the Idempotency-Key record a submission writes in the same step as its job."""
from __future__ import annotations

import dataclasses

WEBHOOK_EVENTS = ("started", "completed")  # what ``webhook_events`` may name, in the order they happen


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a worker finds when it starts a computation."""

    already_done: bool
    image: bytes | None
    attempt: int  # 1 on the first delivery; more after deliveries that crashed; 0: not in flight (not counted)
    skipped: bool = False  # no job waits for it any more (canceled, or past its deadline): not computed
    expired: int = 0  # its queued jobs this claim failed ``deadline_exceeded`` (past their deadline_s)


@dataclasses.dataclass(frozen=True)
class JobContext:
    """Who submitted a job and whom to tell when it settles."""

    owner: str = ""  # API key id; "" for anonymous jobs (each key sees only its own jobs)
    callback_url: str | None = None
    batch_id: str | None = None
    webhook_events: tuple[str, ...] = ("completed",)  # of WEBHOOK_EVENTS: which events call back
    traceparent: str = ""  # the submit's trace (shared.tracing): the webhook attempts join it
    deadline_at: float = 0.0  # unix seconds: not started by then, it fails deadline_exceeded; 0: none

    def fields(self) -> dict[str, str]:
        """Return the job-hash fields this context adds (``announce`` marks jobs someone awaits)."""
        fields = {"owner": self.owner}
        if self.callback_url:
            fields["callback_url"] = self.callback_url
        if self.batch_id:
            fields["batch_id"] = self.batch_id
        if self.callback_url or self.batch_id:
            fields["announce"] = "1"
        if self.callback_url and self.webhook_events != ("completed",):
            fields["webhook_events"] = ",".join(self.webhook_events)
            if "started" in self.webhook_events:
                fields["announce_started"] = "1"  # the claim lists it for a job.started event
        if self.traceparent:
            fields["traceparent"] = self.traceparent
        if self.deadline_at:
            fields["deadline"] = f"{self.deadline_at:.3f}"  # CLAIM compares it with the time it claims
        return fields


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """An Idempotency-Key's pending claim and the answer to store over it, in the step that writes the job.

    The submit script stores ``cached`` (answered 200) or ``queued`` (202) under ``name`` only while
    ``name`` still holds ``claim``: the job and its key's answer are written together, or neither.
    """

    name: str
    claim: str
    cached: str
    queued: str
    ttl_s: int
