"""Behind a reverse proxy (TRUSTED_PROXIES=N, Werkzeug's ProxyFix) every client keeps its own address:
its own rate limit and its own admin-token lockout. Without the setting a forwarded header is ignored,
so a client cannot pick its address. The real app on the session's real Redis, through the test client."""
from __future__ import annotations

import itertools

import pytest

from shared.keys import tokenfail_key
from shared.settings import Settings
from web import create_app
from web.tokens import MAX_FAILURES

PROXY = "192.0.2.10"  # every request reaches the app from the proxy's address
ADMIN_TOKEN = "proxy-test-admin-token-5b1e7c9a3d2f4068"
ADMIN_API = "/api/v1/admin/workers"
RATE = 5  # requests a minute per client, for this app
_clients = (f"203.0.113.{n}" for n in itertools.count(1))  # TEST-NET-3: fresh client addresses


@pytest.fixture
def two_clients(redis_client):
    """Two client addresses no other test used; their counters are removed afterwards."""
    pair = next(_clients), next(_clients)
    yield pair
    for address in (*pair, PROXY):
        for key in redis_client.scan_iter(f"*{address}*"):
            redis_client.delete(key)


def app_behind_proxy(redis_url: str, **env):
    return create_app(Settings.from_env({"REDIS_URL": redis_url, "ADMIN_TOKEN": ADMIN_TOKEN,
                                         "RATE_LIMIT": f"{RATE}/minute", **env}))


def through_proxy(app, path: str, client: str, token: str | None = None):
    """GET ``path`` as the proxy forwards it: the client's own X-Forwarded-For (forged here) and the
    address the proxy saw appended."""
    headers = {"X-Forwarded-For": f"198.51.100.77, {client}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return app.test_client().get(path, headers=headers, environ_base={"REMOTE_ADDR": PROXY})


def test_behind_a_trusted_proxy_each_client_has_its_own_token_lockout(redis_url, redis_client, two_clients):
    guesser, admin = two_clients
    app = app_behind_proxy(redis_url, TRUSTED_PROXIES="1")
    for attempt in range(MAX_FAILURES):
        assert through_proxy(app, ADMIN_API, guesser, f"guess-{attempt}").status_code == 401
    assert through_proxy(app, ADMIN_API, guesser, ADMIN_TOKEN).status_code == 429
    assert through_proxy(app, ADMIN_API, admin, ADMIN_TOKEN).status_code == 200  # not locked out with the guesser
    assert int(redis_client.get(tokenfail_key(guesser))) == MAX_FAILURES
    assert not redis_client.exists(tokenfail_key(PROXY)) and not redis_client.exists(tokenfail_key("198.51.100.77"))


def test_behind_a_trusted_proxy_each_client_has_its_own_rate_limit(redis_url, two_clients):
    busy, other = two_clients
    app = app_behind_proxy(redis_url, TRUSTED_PROXIES="1")
    unknown = "/api/v1/jobs/" + "0" * 32
    assert [through_proxy(app, unknown, busy).status_code for _ in range(RATE + 1)] == [404] * RATE + [429]
    assert through_proxy(app, unknown, other).status_code == 404


def test_without_trusted_proxies_a_forwarded_address_is_not_believed(redis_url, two_clients):
    guesser, admin = two_clients
    app = app_behind_proxy(redis_url)  # TRUSTED_PROXIES defaults to 0
    for attempt in range(MAX_FAILURES):
        assert through_proxy(app, ADMIN_API, guesser, f"guess-{attempt}").status_code == 401
    assert through_proxy(app, ADMIN_API, admin, ADMIN_TOKEN).status_code == 429  # one address: the proxy's
