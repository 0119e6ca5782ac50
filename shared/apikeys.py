"""API keys: created and revoked by an operator (``flask --app web.wsgi keys ...``), checked per request.

A key reads ``imgsvc_<id>_<secret>``. Redis keeps ``apikey:<id>`` with the SHA-256 of the whole key
(keys are 192-bit random, so a fast hash is enough), never the key itself. Keys do not expire: they
are configuration, revoked explicitly, and the set stays small.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time

import redis

from shared.keys import apikey_key

KEY_PREFIX = "imgsvc_"
KEYS_SET = "apikeys"
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0  # a key's share of the workers against a key of weight 1


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """What we know about one key (never the key itself)."""

    id: str
    name: str
    created_at: float
    revoked_at: float | None = None
    webhook_url: str | None = None  # default endpoint for this key's jobs without callback_url
    rate_limit: str | None = None  # overrides RATE_LIMIT, e.g. "100/minute"
    weight: float = 1.0  # fair share: a key of weight w waits as if it had 1/w of its backlog

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "created_at": self.created_at,
                "revoked_at": self.revoked_at, "webhook_url": self.webhook_url, "rate_limit": self.rate_limit,
                "weight": self.weight}

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> "ApiKey":
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(id=f["id"], name=f["name"], created_at=float(f["created_at"]),
                   revoked_at=float(f["revoked_at"]) if f.get("revoked_at") else None,
                   webhook_url=f.get("webhook_url") or None, rate_limit=f.get("rate_limit") or None,
                   weight=float(f.get("weight") or 1.0))


class KeyStore:
    """Create, list, revoke and check API keys in Redis."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def create(self, name: str, webhook_url: str | None = None, rate_limit: str | None = None) -> tuple[ApiKey, str]:
        """Store a new key; return it and the token (shown once, never stored)."""
        key_id = secrets.token_hex(6)
        token = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
        key = ApiKey(key_id, name, time.time(), webhook_url=webhook_url, rate_limit=rate_limit)
        mapping = {"id": key_id, "name": name, "created_at": key.created_at, "digest": _digest(token),
                   "webhook_url": webhook_url or "", "rate_limit": rate_limit or ""}
        pipe = self.redis.pipeline()
        pipe.hset(apikey_key(key_id), mapping=mapping)
        pipe.sadd(KEYS_SET, key_id)
        pipe.execute()
        return key, token

    def get(self, key_id: str) -> ApiKey | None:
        fields = self.redis.hgetall(apikey_key(key_id))
        return ApiKey.from_hash(fields) if fields else None

    def list(self) -> list[ApiKey]:
        ids = sorted(i.decode() for i in self.redis.smembers(KEYS_SET))
        keys = [self.get(key_id) for key_id in ids]
        return sorted((k for k in keys if k is not None), key=lambda k: k.created_at)

    def set_weight(self, key_id: str, weight: float) -> ApiKey | None:
        """Set the key's fair-share weight (checked by the caller against MIN_WEIGHT..MAX_WEIGHT);
        return it, or None when unknown. New work of the key is ordered by it from now on."""
        if not self.redis.exists(apikey_key(key_id)):
            return None
        self.redis.hset(apikey_key(key_id), "weight", repr(float(weight)))
        return self.get(key_id)

    def revoke(self, key_id: str) -> ApiKey | None:
        """Mark the key revoked (it stops working at once); return it, or None when unknown."""
        if not self.redis.exists(apikey_key(key_id)):
            return None
        self.redis.hsetnx(apikey_key(key_id), "revoked_at", time.time())
        return self.get(key_id)

    def authenticate(self, token: str) -> ApiKey | None:
        """Return the active key ``token`` names, or None when it is malformed, unknown or revoked."""
        if not token.startswith(KEY_PREFIX) or len(token) > 200:
            return None
        key_id, _, rest = token[len(KEY_PREFIX):].partition("_")
        if not key_id or not rest:
            return None
        fields = self.redis.hgetall(apikey_key(key_id))
        if not fields or not hmac.compare_digest(fields.get(b"digest", b"").decode(), _digest(token)):
            return None
        key = ApiKey.from_hash(fields)
        return key if key.active else None
