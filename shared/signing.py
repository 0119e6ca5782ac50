"""Standard Webhooks v1 signatures, and the secrets they are made with.

A secret is ``whsec_<base64 of the key bytes>``. The signature of one attempt is
``v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>``.

An API key's webhook secret is never stored: it is derived from the server's SECRET_KEY and the
key's id, so the database holds nothing that could sign a webhook.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """Return a fresh random signing secret (for WEBHOOK_SECRET)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def derive_secret(secret_key: str, key_id: str) -> str:
    """Return the webhook secret of API key ``key_id`` under the server's ``secret_key``."""
    if not secret_key:
        raise ValueError("SECRET_KEY is not set, so API keys have no webhook secret")
    raw = hmac.new(secret_key.encode(), f"webhook-secret:{key_id}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(raw).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` header value for one delivery attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()

