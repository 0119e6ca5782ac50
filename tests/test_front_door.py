"""The nginx front door of docker-compose.yml agrees with the service it guards (file checks only).

`make compose-test` proves it on a real engine: 200 slow clients held open at the proxy while an
upload and /healthz are answered promptly (scripts/compose_test.py, check_slow_clients).
"""
from __future__ import annotations

import re

import yaml

from shared.settings import REPO_ROOT, Settings
from web.api import MAX_WAIT_S

NGINX = REPO_ROOT / "deploy" / "nginx"


def directives(text: str | None = None) -> dict[str, list[str]]:
    """Each nginx directive's values (comments dropped), in order of appearance."""
    text = re.sub(r"#[^\n]*", "", (NGINX / "nginx.conf").read_text() if text is None else text)
    found: dict[str, list[str]] = {}
    for statement in re.findall(r"([a-z_]+)\s+([^;{}]+);", text):
        found.setdefault(statement[0], []).append(statement[1].strip())
    return found


def location(path: str) -> dict[str, list[str]]:
    text = (NGINX / "nginx.conf").read_text()
    return directives(re.search(r"location\s+" + re.escape(path) + r"\s*\{([^}]*)\}", text).group(1))


def kib(value: str) -> int:
    return int(value.removesuffix("k"))


def seconds(value: str) -> int:
    return int(value.removesuffix("s"))


def compose_services() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]


def test_body_caps_are_the_web_tiers():
    from web import MULTIPART_SLACK
    from web.batches import BATCH_BODY_IMAGES

    web = compose_services()["web"]["environment"]
    upload = int(web["MAX_UPLOAD_MB"]) * 1024 * 1024
    assert upload == Settings().max_upload_bytes
    server_cap = [v for v in directives()["client_max_body_size"] if v not in location("= /api/v1/batches").get(
        "client_max_body_size", [])]
    assert [kib(v) * 1024 for v in server_cap] == [upload + MULTIPART_SLACK]
    assert [kib(v) * 1024 for v in location("= /api/v1/batches")["client_max_body_size"]] == [
        upload * BATCH_BODY_IMAGES + 64 * 1024]
    assert location("/")["proxy_pass"] == location("= /api/v1/batches")["proxy_pass"] == ["http://web"]


def test_requests_are_read_whole_within_timeouts_before_gunicorn_sees_them():
    found = directives()
    assert found["proxy_request_buffering"] == ["on"]
    assert seconds(found["client_header_timeout"][0]) <= 10
    assert seconds(found["client_body_timeout"][0]) <= 60 and seconds(found["send_timeout"][0]) <= 60
    assert seconds(found["proxy_read_timeout"][0]) > MAX_WAIT_S  # a ?wait= long-poll is not cut


def test_the_client_address_is_passed_on_and_trusted_for_one_hop():
    headers = dict(value.split(None, 1) for value in directives()["proxy_set_header"])
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert compose_services()["web"]["environment"]["TRUSTED_PROXIES"] == "1"


def test_only_the_proxy_faces_clients():
    services = compose_services()
    assert "ports" not in services["web"]
    assert services["proxy"]["ports"] == ["127.0.0.1:8000:8080"] and "listen 8080" in (NGINX / "nginx.conf").read_text()
    assert services["proxy"]["build"] == "deploy/nginx"
    assert "apt-get install" in (NGINX / "Dockerfile").read_text()  # Debian's package, built here
