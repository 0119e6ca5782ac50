"""Who is calling: API keys (``Authorization: Bearer``), AUTH_REQUIRED, and per-key rate limits.

Flask-Limiter checks limits in an app-wide before_request hook that runs before any blueprint
hook, so the caller is resolved lazily (once per request, never raising) by whichever asks first:
the limiter's key function or ``require_caller``.
"""
from __future__ import annotations

import time

from flask import Flask, current_app, g, request
from flask_limiter import Limiter

from shared.apikeys import ApiKey
from shared.errors import AuthRequired, InvalidApiKey

_UNSET = object()


def _services():
    return current_app.extensions["imgsvc"]


def _resolve() -> tuple[ApiKey | None, InvalidApiKey | None]:
    """Return the calling key (or None) and the error a bad Authorization header deserves."""
    cached = g.get("caller", _UNSET)
    if cached is not _UNSET:
        return cached
    header = request.headers.get("Authorization", "").strip()
    result: tuple[ApiKey | None, InvalidApiKey | None] = (None, None)
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            result = (None, InvalidApiKey("Send the API key as 'Authorization: Bearer <key>'."))
        else:
            key = _services().keys.authenticate(token.strip())
            result = (key, None) if key else (None, InvalidApiKey("The API key is unknown or revoked."))
    g.caller = result
    return result


def current_key() -> ApiKey | None:
    return _resolve()[0]


def owner() -> str:
    """The id of the calling key, or "" for an anonymous caller; jobs are visible to their owner only."""
    key = current_key()
    return key.id if key else ""


def require_caller() -> None:
    """Refuse a bad key always, and a missing one on writes when AUTH_REQUIRED is set."""
    key, error = _resolve()
    if error is not None:
        raise error
    if key is None and request.method == "POST" and _services().settings.auth_required:
        raise AuthRequired("This service requires an API key: send 'Authorization: Bearer <key>'.")


def share() -> str:
    """The sender, as fair share and rate limits count it: ``key:<id>``, or ``addr:<address>`` anonymously."""
    key = current_key()
    return f"key:{key.id}" if key else f"addr:{request.remote_addr}"


def _rate_key() -> str:
    return share()


def _rate_limit() -> str:
    key = current_key()
    return (key.rate_limit if key and key.rate_limit else None) or _services().settings.rate_limit


def install_limiter(app: Flask, storage_uri: str, blueprints, exempt=(), storage_options=None) -> Limiter:
    """Rate-limit every route of ``blueprints`` but ``exempt`` per key (or per address), counted in Redis.

    ``storage_uri`` is a limits storage URI (``redis://`` or ``redis+sentinel://``), ``storage_options``
    its storage's keyword arguments (shared.sentinel.limiter_storage makes both).

    Flask-Limiter's own headers cost two more Redis reads on every response; a refusal writes its
    headers instead (``refusal_headers``), so an allowed request pays one round trip for its limit.
    """
    limiter = Limiter(key_func=_rate_key, storage_uri=storage_uri, storage_options=storage_options or {},
                      headers_enabled=False, swallow_errors=True, strategy="fixed-window", key_prefix="ratelimit")
    limiter.init_app(app)
    app.extensions["imgsvc-limiter"] = limiter
    for bp in blueprints:
        limiter.limit(_rate_limit)(bp)
    for view in exempt:
        limiter.exempt(view)
    return limiter


def refusal_headers() -> dict[str, str]:
    """Return Retry-After and X-RateLimit-* for the limit the current request broke."""
    breached = current_app.extensions["imgsvc-limiter"].current_limit
    if breached is None:
        return {"Retry-After": "1"}
    reset_at = breached.reset_at
    return {"Retry-After": str(max(1, int(reset_at - time.time()))), "X-RateLimit-Limit": str(breached.limit.amount),
            "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(reset_at))}
