"""The admin surfaces' tokens (web/tokens.py): failures limited per address, long tokens only, never in a
URL, /metrics behind a token, worker metrics on loopback. The real app, on the session's real Redis."""
from __future__ import annotations

import itertools
import time

import pytest
import requests

from shared.keys import tokenfail_key
from shared.settings import Settings, SettingsError
from tools.stack import free_port
from web import create_app
from web.tokens import FAILURE_WINDOW_S, MAX_FAILURES

ADMIN_TOKEN = "security-test-admin-token-7e2c91d04fb3a658"
METRICS_TOKEN = "security-test-metrics-token-30d8b6a1c5f2e974"
ADMIN_API = "/api/v1/admin/workers"
_addresses = (f"198.51.100.{n}" for n in itertools.count(1))  # TEST-NET-2: one fresh address per use


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def address(redis_client):
    """A client address no other test used; its failure count is removed afterwards."""
    addr = next(_addresses)
    yield addr
    redis_client.delete(tokenfail_key(addr))


def app_with(redis_url: str, **tokens):
    return create_app(Settings(redis_url=redis_url, **tokens))


@pytest.fixture(scope="module")
def both(redis_url):
    """The app with an ADMIN_TOKEN and a METRICS_TOKEN."""
    return app_with(redis_url, admin_token=ADMIN_TOKEN, metrics_token=METRICS_TOKEN)


def get(app, path: str, address: str, headers: dict | None = None, query: dict | None = None):
    return app.test_client().get(path, headers=headers or {}, query_string=query,
                                 environ_base={"REMOTE_ADDR": address})


@pytest.mark.parametrize("path, right", [(ADMIN_API, ADMIN_TOKEN), ("/metrics", METRICS_TOKEN)],
                         ids=["admin-api", "metrics"])
def test_the_eleventh_bad_token_in_a_minute_is_refused_even_the_right_one(both, redis_client, address, path,
                                                                         right):
    for _ in range(15):  # successes and requests that send no token count for nothing
        assert get(both, path, address, bearer(right)).status_code == 200
        assert get(both, path, address).status_code == 401
    assert not redis_client.exists(tokenfail_key(address))

    for attempt in range(MAX_FAILURES):
        answer = get(both, path, address, bearer(f"guess-{attempt}"))
        assert answer.status_code == 401, attempt
    assert int(redis_client.get(tokenfail_key(address))) == MAX_FAILURES
    assert 0 < redis_client.ttl(tokenfail_key(address)) <= FAILURE_WINDOW_S

    for headers in (bearer("guess-11"), bearer(right), {}):
        refused = get(both, path, address, headers)
        assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "rate_limited"
        assert 0 < int(refused.headers["Retry-After"]) <= FAILURE_WINDOW_S
    assert get(both, path, next(_addresses), bearer(right)).status_code == 200  # another address is not

    redis_client.expire(tokenfail_key(address), 1)  # the window ends
    time.sleep(1.2)
    assert get(both, path, address, bearer(right)).status_code == 200


def test_admin_and_metrics_failures_share_one_count_per_address(both, address):
    for attempt in range(MAX_FAILURES):
        path = (ADMIN_API, "/metrics")[attempt % 2]
        assert get(both, path, address, bearer("guess")).status_code == 401
    assert get(both, "/metrics", address, bearer(METRICS_TOKEN)).status_code == 429
    assert get(both, ADMIN_API, address, bearer(ADMIN_TOKEN)).status_code == 429


@pytest.mark.parametrize("name", ["ADMIN_TOKEN", "METRICS_TOKEN"])
def test_tokens_shorter_than_32_characters_are_refused_at_start_up(name):
    with pytest.raises(SettingsError, match=rf"{name} must be at least 32 characters") as refused:
        Settings.from_env({name: "x" * 31})
    assert "secrets.token_urlsafe(32)" in str(refused.value)  # says how to make one
    assert getattr(Settings.from_env({name: "x" * 32}), name.lower()) == "x" * 32
    assert getattr(Settings.from_env({name: "  "}), name.lower()) == ""  # empty: the surface is off


@pytest.mark.parametrize("parameter", ["token", "access_token"])
@pytest.mark.parametrize("path", [ADMIN_API, "/admin", "/metrics"])
def test_a_token_in_the_url_is_refused(both, redis_client, address, path, parameter):
    answer = get(both, path, address, query={parameter: ADMIN_TOKEN})
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert error["code"] == "token_in_url" and "Authorization: Bearer" in error["message"]
    assert get(both, path, address, bearer(ADMIN_TOKEN), query={parameter: ADMIN_TOKEN}).status_code == 400
    assert not redis_client.exists(tokenfail_key(address))


def test_metrics_are_off_without_a_token(redis_url, address):
    answer = get(app_with(redis_url), "/metrics", address, bearer(METRICS_TOKEN))
    assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("tokens", [{"metrics_token": METRICS_TOKEN}, {"admin_token": ADMIN_TOKEN},
                                    {"metrics_token": METRICS_TOKEN, "admin_token": ADMIN_TOKEN}],
                         ids=["metrics-token", "admin-token", "both"])
def test_metrics_need_the_metrics_token_or_the_admin_token(redis_url, address, tokens):
    app = app_with(redis_url, **tokens)
    for headers in ({}, bearer("wrong"), {"Authorization": next(iter(tokens.values()))}):
        refused = get(app, "/metrics", address, headers)
        assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "metrics_unauthorized"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    for token in tokens.values():
        answer = get(app, "/metrics", address, bearer(token))
        assert answer.status_code == 200 and "imgsvc_jobs_submitted_total" in answer.get_data(as_text=True)


def test_the_metrics_token_does_not_open_the_admin_api(both, address):
    assert get(both, ADMIN_API, address, bearer(METRICS_TOKEN)).status_code == 401


@pytest.mark.parametrize("env, bound", [({}, "127.0.0.1"), ({"WORKER_METRICS_BIND": "0.0.0.0"}, "0.0.0.0")],
                         ids=["default", "told-otherwise"])
def test_worker_metrics_listen_on_loopback_unless_told_otherwise(redis_url, env, bound):
    from worker.metrics import serve_metrics, stop_metrics

    port = free_port()
    settings = Settings.from_env({"REDIS_URL": redis_url, "WORKER_METRICS_PORT": str(port), **env})
    server = serve_metrics(settings, ["m"], "bind-test@h")
    try:
        assert server.server_address[:2] == (bound, port)
        answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert answer.status_code == 200 and "imgsvc_worker_children" in answer.text
    finally:
        stop_metrics(server)
