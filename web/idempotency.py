"""``Idempotency-Key`` on the POSTs that create work: a retried request gets the original answer.

The first request with a key claims ``idem:<owner>:<sha256(key)>`` as pending with the request's
fingerprint and the endpoint it was sent to (``job`` or ``batch``), then stores what it created. A
replay with the same fingerprint on the same endpoint gets that back; otherwise it is refused (422);
while the first is still being accepted, 409 with ``Retry-After``. A job and its key's answer are
written in one step (the submit script stores the answer over the claim: ``JobStore.submit``'s
``key``), so no job exists whose key does not name it; a batch's answer is stored by the step that
shows the batch (``BatchStore.open``). A request that fails releases its claim, so the client can retry it. A request that dies (its process killed) cannot release it: the
pending claim has a lease of its own (IDEMPOTENCY_LEASE_S), after which the key may be used again;
the finished record is kept IDEMPOTENCY_TTL_S.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import secrets

import redis

from shared.errors import BadRequest, IdempotencyInProgress, IdempotencyKeyReused
from shared.jobtypes import KeyRecord
from shared.keys import idempotency_key

log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 255

# Store what the claim created, unless the lease ran out and another request claimed the key since.
_COMPLETE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# Let go of the claim, only if it is still this request's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Forget the answer this request stored (its token), for a job it made and then undid.
_FORGET = """
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
local ok, record = pcall(cjson.decode, held)
if ok and type(record) == 'table' and record['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclasses.dataclass(frozen=True)
class Created:
    """What an idempotent request made: a ``job`` or ``batch`` id, and the status it was answered with."""

    kind: str
    id: str
    status: int


@dataclasses.dataclass(frozen=True)
class Lease:
    """A request's pending claim on a key: the record name and the exact claim it wrote."""

    name: str
    claim: str

    @property
    def token(self) -> str:
        return json.loads(self.claim)["token"]


def fingerprint(*parts: object) -> str:
    """Return a stable digest of what makes two requests the same request."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def check_key(raw: str) -> str:
    if not raw or len(raw) > MAX_KEY_LENGTH or not raw.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.")
    return raw


class IdempotencyStore:
    """Claims, completes and replays idempotency keys in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int, lease_s: int = 30):
        self.redis, self.ttl_s, self.lease_s = client, ttl_s, lease_s
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._forget = client.register_script(_FORGET)

    def begin(self, owner: str, key: str, print_: str, kind: str = "job") -> Created | Lease:
        """Claim ``key`` for a new ``kind`` request (a Lease), or return what an earlier identical
        request created."""
        name = idempotency_key(owner, key)
        # the token tells this claim from an identical one made after its lease ran out
        claim = json.dumps({"state": "pending", "kind": kind, "fingerprint": print_, "token": secrets.token_hex(8)})
        for _ in range(2):  # a record that expires between SET NX and GET: claim again
            if self.redis.set(name, claim, nx=True, ex=self.lease_s):
                return Lease(name, claim)
            raw, ttl_ms = self.redis.pipeline(transaction=False).get(name).pttl(name).execute()
            if raw is not None:
                return self._replay(json.loads(raw), print_, kind, ttl_ms)
        raise IdempotencyInProgress("Another request with this Idempotency-Key is being accepted; retry shortly.",
                                    retry_after_s=1)

    @staticmethod
    def _replay(record: dict, print_: str, kind: str, ttl_ms: int) -> Created:
        if record["fingerprint"] != print_ or record.get("kind", kind) != kind:
            raise IdempotencyKeyReused("This Idempotency-Key was used with a different request; "
                                       "use a new key for new work.")
        if record["state"] == "pending":
            retry_s = max(1, math.ceil(ttl_ms / 1000))
            raise IdempotencyInProgress("The first request with this Idempotency-Key is still being accepted; "
                                        f"retry in {retry_s} s (Retry-After).", retry_after_s=retry_s)
        return Created(record["kind"], record["id"], record["status"])

    def record_for(self, lease: Lease, print_: str, job_id: str) -> KeyRecord:
        """What the submit script stores over ``lease`` in the step that writes job ``job_id``."""
        cached, queued = (self._record(lease, print_, Created("job", job_id, status)) for status in (200, 202))
        return KeyRecord(lease.name, lease.claim, cached, queued, self.ttl_s)

    def record_for_batch(self, lease: Lease, print_: str, batch_id: str) -> KeyRecord:
        """What the script that shows batch ``batch_id`` stores over ``lease`` (its 202 answer)."""
        answer = self._record(lease, print_, Created("batch", batch_id, 202))
        return KeyRecord(lease.name, lease.claim, answer, answer, self.ttl_s)

    @staticmethod
    def _record(lease: Lease, print_: str, created: Created) -> str:
        return json.dumps({"state": "done", "fingerprint": print_, "token": lease.token, **dataclasses.asdict(created)})

    def complete(self, lease: Lease, print_: str, created: Created) -> None:
        """Store what the request made over its claim (a batch; a job's answer is stored with the job)."""
        record = self._record(lease, print_, created)
        if not self._complete(keys=[lease.name], args=[lease.claim, record, self.ttl_s]):
            log.warning("%s %s was created after its Idempotency-Key's lease (IDEMPOTENCY_LEASE_S) ran out "
                        "and another request claimed the key", created.kind, created.id)

    def release(self, lease: Lease) -> None:
        self._release(keys=[lease.name], args=[lease.claim])

    def forget(self, lease: Lease) -> None:
        """Drop the answer stored for ``lease``: the job it names was undone (failed before it was queued)."""
        self._forget(keys=[lease.name], args=[lease.token])
