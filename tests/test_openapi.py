"""The OpenAPI document: valid 3.1, complete against the app's URL map, and true of the live service."""
from __future__ import annotations

import inspect
import json
import re

import hypothesis
import pytest
import schemathesis
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared import errors
from shared.settings import Settings
from tests import images
from web.openapi import build_spec

pytestmark = pytest.mark.integration

SPEC_URL = "/api/v1/openapi.json"
UNDOCUMENTED_METHODS = {"HEAD", "OPTIONS"}
EXAMPLES_PER_OPERATION = 30
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


def live_cases() -> list:
    """Every documented operation but the admin actions (they drain and resize real workers), with
    valid data and, where the operation takes any input, with invalid data too."""
    cases = []
    for path, item in build_spec(Settings())["paths"].items():
        for method, operation in item.items():
            if method == "post" and path.startswith("/api/v1/admin/"):
                continue
            takes_input = "parameters" in operation or "requestBody" in operation
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:2 if takes_input else 1]:
                cases.append(pytest.param(method, path, mode, id=f"{method.upper()} {path} {mode.value}"))
    return cases


@pytest.fixture(scope="module")
def live_schema(base_url):
    """The document as the live stack (gunicorn, Redis, a Celery worker) serves it."""
    config = schemathesis.Config.from_dict({"base-url": base_url, "request-timeout": 45})
    return schemathesis.openapi.from_url(base_url + SPEC_URL, config=config, timeout=10)


# schemathesis' own pytest integration (from_fixture) needs a Node._nodeid that pytest 9 no longer has,
# so each operation is a plain parametrized test driving the operation's Hypothesis strategy.
@pytest.mark.parametrize(("method", "path", "mode"), live_cases())
def test_live_service_conforms_to_document(live_schema, method, path, mode):
    """Fuzz the operation (junk images included): never a 5xx, every answer as documented."""
    operation = live_schema[path][method]

    @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                         phases=[hypothesis.Phase.generate],  # no shrinking: every example is a request
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def answers_as_documented(case):
        case.call_and_validate(checks=CHECKS)

    answers_as_documented()


def call(schema, method: str, path: str, **case) -> dict:
    """Send one request the document describes and check its answer as the fuzzing does."""
    response = schema[path][method].Case(**case).call_and_validate(checks=CHECKS)
    try:
        body = response.json()
    except ValueError:  # the heatmap PNG
        body = None
    return {"status": response.status_code, "json": body}


def test_live_answers_for_real_work_are_as_documented(live_schema):
    """The success answers fuzzing rarely reaches: a real job, its heatmap and deliveries, a real batch."""
    jpeg, png = images.chelsea_jpeg(), images.encode(images.coffee(), "PNG")
    submitted = call(live_schema, "post", "/api/v1/jobs", body={"image": jpeg, "top_k": 2},
                     media_type="multipart/form-data")
    assert submitted["status"] in (200, 202)
    job = {"job_id": submitted["json"]["id"]}
    done = call(live_schema, "get", "/api/v1/jobs/{job_id}", path_parameters=job, query={"wait": 30})
    assert done["json"]["status"] == "done"
    assert call(live_schema, "get", "/api/v1/jobs/{job_id}/gradcam.png", path_parameters=job)["status"] == 200
    assert call(live_schema, "get", "/api/v1/jobs/{job_id}/deliveries", path_parameters=job)["status"] == 200
    refused = call(live_schema, "post", "/api/v1/jobs/{job_id}/deliveries/redeliver", path_parameters=job)
    assert (refused["status"], refused["json"]["error"]["code"]) == (409, "no_callback")

    batch = call(live_schema, "post", "/api/v1/batches", body={"image": [jpeg, png], "gradcam": False},
                 media_type="multipart/form-data")
    assert batch["status"] == 202 and batch["json"]["counts"]["total"] == 2
    read = call(live_schema, "get", "/api/v1/batches/{batch_id}",
                path_parameters={"batch_id": batch["json"]["id"]})
    assert [j["id"] for j in read["json"]["jobs"]] == [j["id"] for j in batch["json"]["jobs"]]
