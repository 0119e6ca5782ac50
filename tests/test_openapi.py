"""The OpenAPI document: valid 3.1, complete against the app's URL map, and true of the live service."""
from __future__ import annotations

import inspect
import json
import re

import pytest
import schemathesis
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared import errors
from web.openapi import build_spec

pytestmark = pytest.mark.integration

SPEC_URL = "/api/v1/openapi.json"
UNDOCUMENTED_METHODS = {"HEAD", "OPTIONS"}
EXAMPLES_PER_OPERATION = 20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


def normalise(path: str) -> str:
    """Name every path parameter the same, so Flask's ``<id>`` and OpenAPI's ``{id}`` compare equal."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def http_error_codes() -> set[str]:
    """Every ``code`` the API can answer with: ServiceErrors with a 4xx status or 503."""
    return {cls.code for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.ServiceError) and not issubclass(cls, errors.JobFailed)
            and (cls.status < 500 or cls.status == 503)}


def test_document_is_valid_openapi_31(settings):
    spec = build_spec(settings)
    assert spec["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(spec).validate()


def test_every_registered_endpoint_is_documented(app, settings):
    documented = {(normalise(path), method.upper())
                  for path, item in build_spec(settings)["paths"].items() for method in item}
    registered = {(normalise(rule.rule), method)
                  for rule in app.url_map.iter_rules()
                  if rule.rule.startswith("/api/v1/") or rule.rule in ("/healthz", "/readyz", "/metrics")
                  for method in rule.methods - UNDOCUMENTED_METHODS}
    assert registered - documented == set(), "endpoints missing from web/openapi.py"
    assert documented - registered == set(), "documented endpoints the app does not serve"


def test_document_is_served_uncached_with_every_error_code(client):
    response = client.get(SPEC_URL)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-cache"
    text = json.dumps(response.get_json())
    missing = sorted(code for code in http_error_codes() if f"`{code}`" not in text)
    assert missing == [], "error codes not documented in any response description"


@pytest.fixture(scope="module")
def live_schema(base_url):
    """The document as the live stack (gunicorn, Redis, a Celery worker) serves it."""
    config = schemathesis.Config.from_dict({
        "seed": 20261123,
        "base-url": base_url,
        "request-timeout": 45,
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True, "database": "none"},
    })
    return schemathesis.openapi.from_url(base_url + SPEC_URL, config=config, timeout=10)


live = schemathesis.pytest.from_fixture("live_schema").exclude(method="POST", path_regex="^/api/v1/admin/")


@live.parametrize()
def test_live_service_conforms_to_document(case):
    """Fuzz every operation (junk images included): never a 5xx, every answer as documented."""
    case.call_and_validate(checks=CHECKS)
