"""``Idempotency-Key`` on the POSTs that create work: a retried request gets the original answer.

The first request with a key claims ``idem:<owner>:<sha256(key)>`` as pending with the request's
fingerprint, then stores what it created. A replay with the same fingerprint gets that back; with
another fingerprint it is refused (422); while the first is still being accepted, 409. A request that
fails releases its claim, so the client can retry it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import redis

from shared.errors import BadRequest, IdempotencyInProgress, IdempotencyKeyReused
from shared.keys import idempotency_key

MAX_KEY_LENGTH = 255


@dataclasses.dataclass(frozen=True)
class Created:
    """What an idempotent request made: a ``job`` or ``batch`` id, and the status it was answered with."""

    kind: str
    id: str
    status: int


def fingerprint(*parts: object) -> str:
    """Return a stable digest of what makes two requests the same request."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def check_key(raw: str) -> str:
    if not raw or len(raw) > MAX_KEY_LENGTH or not raw.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.")
    return raw


class IdempotencyStore:
    """Claims, completes and replays idempotency keys in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis, self.ttl_s = client, ttl_s

    def begin(self, owner: str, key: str, print_: str) -> Created | None:
        """Claim ``key`` for a new request, or return what an earlier identical request created."""
        name = idempotency_key(owner, key)
        claim = json.dumps({"state": "pending", "fingerprint": print_})
        for _ in range(2):  # a record that expires between SET NX and GET: claim again
            if self.redis.set(name, claim, nx=True, ex=self.ttl_s):
                return None
            raw = self.redis.get(name)
            if raw is not None:
                return self._replay(json.loads(raw), print_)
        raise IdempotencyInProgress("Another request with this Idempotency-Key is being accepted; retry shortly.")

    @staticmethod
    def _replay(record: dict, print_: str) -> Created:
        if record["fingerprint"] != print_:
            raise IdempotencyKeyReused("This Idempotency-Key was used with a different request; "
                                       "use a new key for new work.")
        if record["state"] == "pending":
            raise IdempotencyInProgress("The first request with this Idempotency-Key is still being "
                                        "accepted; retry shortly.")
        return Created(record["kind"], record["id"], record["status"])

    def complete(self, owner: str, key: str, print_: str, created: Created) -> None:
        record = {"state": "done", "fingerprint": print_, **dataclasses.asdict(created)}
        self.redis.set(idempotency_key(owner, key), json.dumps(record), ex=self.ttl_s)

    def release(self, owner: str, key: str) -> None:
        self.redis.delete(idempotency_key(owner, key))
