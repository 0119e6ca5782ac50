"""Bearer tokens of the admin surfaces (the admin API, ``/metrics``).

A token travels only in ``Authorization: Bearer``: one in the URL (``?token=``) is refused, since URLs
land in access logs, proxies and browser history. Failed attempts are counted per client address in
Redis (``tokenfail:<addr>``, a fixed window of FAILURE_WINDOW_S); past MAX_FAILURES that address gets 429
for the rest of the window, even with the right token, so guessing costs a minute per ten tries. A
request that sends no Authorization header is refused (401) but not counted: it guesses nothing.
"""
from __future__ import annotations

import hmac

from flask import current_app, request

from shared.errors import RateLimited, TokenInUrl, Unauthorized
from shared.keys import tokenfail_key

FAILURE_WINDOW_S = 60
MAX_FAILURES = 10
URL_TOKEN_PARAMETERS = ("token", "access_token")


def refuse_token_in_url() -> None:
    """Raise TokenInUrl when the query string carries a token."""
    if any(name in request.args for name in URL_TOKEN_PARAMETERS):
        raise TokenInUrl("Never put the token in the URL (it lands in logs and browser history); send the "
                         "header 'Authorization: Bearer <token>' instead.")


def require_bearer(tokens: tuple[str, ...], missing: Unauthorized, wrong: Unauthorized) -> None:
    """Let the request through only with one of ``tokens`` (non-empty); raise ``missing`` or ``wrong``
    otherwise, and RateLimited while this address has used up its failures."""
    client, key = current_app.extensions["imgsvc"].redis, tokenfail_key(request.remote_addr or "-")
    _refuse_while_locked_out(client, key)
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if not scheme:
        raise missing
    if scheme.lower() != "bearer" or not _matches(given.strip(), tokens):
        _count_failure(client, key)
        raise wrong


def _matches(given: str, tokens: tuple[str, ...]) -> bool:
    """Compare in constant time against every token (no early exit that would tell which one was close)."""
    found = False
    for token in tokens:
        found |= bool(token) and hmac.compare_digest(given.encode(), token.encode())
    return found


def _refuse_while_locked_out(client, key: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.get(key)
    pipe.ttl(key)
    failures, ttl_s = pipe.execute()
    if failures is not None and int(failures) >= MAX_FAILURES:
        wait_s = ttl_s if ttl_s and ttl_s > 0 else FAILURE_WINDOW_S
        raise RateLimited(f"Too many failed token attempts from this address ({MAX_FAILURES} a minute); "
                          f"retry after {wait_s} s.", retry_after_s=wait_s)


def _count_failure(client, key: str) -> None:
    """Add one failure to this address's window (the window starts at its first failure)."""
    pipe = client.pipeline(transaction=True)
    pipe.set(key, 0, ex=FAILURE_WINDOW_S, nx=True)
    pipe.incr(key)
    pipe.execute()
