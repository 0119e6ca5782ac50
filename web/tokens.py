"""Bearer tokens of the admin surfaces (the admin API, ``/metrics``).

A token travels only in ``Authorization: Bearer``: one in the URL (``?token=``) is refused, since URLs
land in access logs, proxies and browser history. Failed attempts are counted per client address in
Redis (``tokenfail:<addr>``, a fixed window of FAILURE_WINDOW_S); past MAX_FAILURES that address gets 429
for the rest of the window, even with the right token, so guessing costs a minute per ten tries. A
request that sends no Authorization header is refused (401) but not counted: it guesses nothing.

Each attempt takes its place in the count before its token is compared, in one atomic step, and a
right token gives its place back: so parallel guesses cannot get more than MAX_FAILURES compared (the
price: more than MAX_FAILURES right tokens from one address at the very same moment may see a 429).
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
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if not scheme:
        _refuse_while_locked_out(client, key)
        raise missing
    _take_an_attempt(client, key)
    if scheme.lower() == "bearer" and _matches(given.strip(), tokens):
        client.eval(_GIVE_BACK, 1, key)
        return
    raise wrong


def _matches(given: str, tokens: tuple[str, ...]) -> bool:
    """Compare in constant time against every token (no early exit that would tell which one was close)."""
    found = False
    for token in tokens:
        found |= bool(token) and hmac.compare_digest(given.encode(), token.encode())
    return found


# Count one attempt unless the address has used up its window: {1 (go on) or 0 (locked out), seconds left}.
_TAKE = """
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
if failures >= tonumber(ARGV[1]) then return {0, redis.call('TTL', KEYS[1])} end
redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return {1, redis.call('TTL', KEYS[1])}
"""
# A right token: the attempt was no failure. The key goes when nothing is left in it (never recreated).
_GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('DECR', KEYS[1]) <= 0 then redis.call('DEL', KEYS[1]) end
"""


def _take_an_attempt(client, key: str) -> None:
    """Count this attempt as a failure before its token is compared; raise RateLimited if none is left."""
    allowed, ttl_s = client.eval(_TAKE, 1, key, MAX_FAILURES, FAILURE_WINDOW_S)
    if not allowed:
        raise _locked_out(ttl_s)


def _refuse_while_locked_out(client, key: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.get(key)
    pipe.ttl(key)
    failures, ttl_s = pipe.execute()
    if failures is not None and int(failures) >= MAX_FAILURES:
        raise _locked_out(ttl_s)


def _locked_out(ttl_s: int) -> RateLimited:
    wait_s = ttl_s if ttl_s and ttl_s > 0 else FAILURE_WINDOW_S
    return RateLimited(f"Too many failed token attempts from this address ({MAX_FAILURES} a minute); "
                       f"retry after {wait_s} s.", retry_after_s=wait_s)
