"""Traces (issue 23, item 1): a job is one OpenTelemetry trace across the web tier, the worker and
the webhook worker, read here from a real OTLP/HTTP receiver that parses the exporters' protobuf."""
from __future__ import annotations

import secrets
import time

import pytest
import requests

from shared.settings import Settings
from tests import images
from tests.conftest import ARTIFACTS, WEBHOOK_SECRET
from tests.receiver import Receiver
from tools import stack

WORKER_HOPS = {"queue wait", "batch", "decode and preprocess", "forward and gradcam", "write results"}


def collected_spans(collector: Receiver) -> list[dict]:
    """Every span the services exported so far, decoded from OTLP/HTTP protobuf."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for post in collector.on("/v1/traces"):
        for resource_spans in ExportTraceServiceRequest.FromString(post.body).resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope in resource_spans.scope_spans:
                spans += [{"name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                           "parent": s.parent_span_id.hex(), "service": service,
                           "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                           "ms": (s.end_time_unix_nano - s.start_time_unix_nano) / 1e6} for s in scope.spans]
    return spans


def tree(spans: list[dict]) -> str:
    """The spans of one trace as an indented tree (docs/operations.md shows one from this test)."""
    children: dict[str, list[dict]] = {}
    for span in spans:
        children.setdefault(span["parent"], []).append(span)
    ids = {span["id"] for span in spans}
    lines = []

    def walk(span: dict, depth: int) -> None:
        link = " (linked to batch)" if span["links"] else ""
        lines.append(f"{'  ' * depth}{span['name']}  [{span['service']}, {span['ms']:.1f} ms]{link}")
        for kid in children.get(span["id"], []):
            walk(kid, depth + 1)

    for root in (s for s in spans if s["parent"] not in ids):
        walk(root, 0)
    return "\n".join(lines)


@pytest.fixture
def traced(tmp_path, monkeypatch, cards_dir):
    """Redis, a worker, the webhook worker and gunicorn, each exporting spans to ``collector``."""
    with Receiver() as collector, Receiver() as hooks:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export within the test's patience
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")  # the default: a caller decides
        redis_proc, url = stack.start_redis(tmp_path)
        settings = Settings(redis_url=url, model_cards_dir=cards_dir, worker_concurrency=1, torch_threads=1,
                            max_batch=4, heartbeat_interval_s=1, worker_ttl_s=5, webhook_secret=WEBHOOK_SECRET,
                            webhook_allow_private=True, fetch_allow_private=True, rate_limit="100000/minute")
        ARTIFACTS.mkdir(exist_ok=True)
        procs = [redis_proc]
        try:
            procs.append(stack.start_worker(settings, ARTIFACTS / "traced-worker.log", name="traced"))
            procs.append(stack.start_webhook_worker(settings, ARTIFACTS / "traced-webhooks.log", name="traced-hooks"))
            web, base = stack.start_web(settings)
            procs.append(web)
            yield base, collector, hooks
        finally:
            for proc in reversed(procs):
                stack.stop(proc)


def _submit(base: str, data: bytes, trace_id: str, **fields) -> requests.Response:
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    return requests.post(f"{base}/api/v1/jobs", files={"image": ("photo.jpg", data, "image/jpeg")},
                         data=fields, headers={"traceparent": traceparent}, timeout=30)


def _trace(collector: Receiver, trace_id: str, names: set[str]) -> list[dict]:
    def complete():
        spans = [s for s in collected_spans(collector) if s["trace"] == trace_id]
        return spans if names <= {s["name"] for s in spans} else None

    return stack.wait_for(complete, 60, f"the spans {sorted(names)} of trace {trace_id}", interval=0.2)


@pytest.mark.integration
def test_a_computed_job_with_a_callback_is_one_trace_hop_by_hop(traced):
    base, collector, hooks = traced
    trace_id = secrets.token_hex(16)
    answer = _submit(base, images.chelsea_jpeg(), trace_id, callback_url=f"{hooks.url}/hook")
    assert answer.status_code == 202, answer.text
    hook = hooks.wait("/hook", 1)[0]
    assert hook.headers["traceparent"].split("-")[1] == trace_id  # the receiver can join the trace

    spans = _trace(collector, trace_id, {"cache lookup", "webhook attempt", *WORKER_HOPS})
    by_name = {span["name"]: span for span in spans}
    request = next(s for s in spans if s["service"] == "imgsvc-web" and s["name"].startswith("POST"))
    assert by_name["cache lookup"]["parent"] == request["id"]
    for hop in ("queue wait", "batch", "webhook attempt"):  # the job's context travelled with it
        assert by_name[hop]["parent"] == request["id"], hop
    assert by_name["queue wait"]["links"] == [(trace_id, by_name["batch"]["id"])]  # a batch serves many jobs
    for hop in ("decode and preprocess", "forward and gradcam", "write results"):
        assert by_name[hop]["parent"] == by_name["batch"]["id"], hop
    assert hook.headers["traceparent"].split("-")[2] == by_name["webhook attempt"]["id"]
    assert {s["service"] for s in spans} == {"imgsvc-web", "imgsvc-worker", "imgsvc-webhooks"}
    (ARTIFACTS / "trace-computed.txt").write_text(tree(spans) + "\n")

    cached_id = secrets.token_hex(16)
    assert _submit(base, images.chelsea_jpeg(), cached_id).status_code == 200
    _trace(collector, cached_id, {"cache lookup"})
    time.sleep(1)  # anything else of that trace would have been exported by now
    cached = [s for s in collected_spans(collector) if s["trace"] == cached_id]
    assert not WORKER_HOPS & {s["name"] for s in cached} and {s["service"] for s in cached} == {"imgsvc-web"}
    (ARTIFACTS / "trace-cached.txt").write_text(tree(cached) + "\n")


@pytest.mark.integration
def test_a_caller_that_does_not_sample_gets_no_spans_anywhere(traced):
    """A ``traceparent`` with the sampled flag off is followed (the default sampler is parent-based):
    no process exports a span of that trace, and the job is done as any other."""
    base, collector, _ = traced
    unsampled = secrets.token_hex(16)
    answer = requests.post(f"{base}/api/v1/jobs", files={"image": ("photo.jpg", images.noise_png(22), "image/jpeg")},
                           headers={"traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"}, timeout=30)
    assert answer.status_code == 202, answer.text
    job_url = f"{base}/api/v1/jobs/{answer.json()['id']}"
    stack.wait_for(lambda: requests.get(job_url, timeout=10).json()["status"] == "done", 60, "the unsampled job")
    sampled = secrets.token_hex(16)  # sent after it: its spans are exported after the unsampled job's would be
    assert _submit(base, images.noise_png(23), sampled).status_code == 202
    _trace(collector, sampled, WORKER_HOPS | {"cache lookup"})
    assert not [s for s in collected_spans(collector) if s["trace"] == unsampled]


@pytest.mark.integration
def test_a_failed_job_is_traced_to_its_failure(traced):
    base, collector, _ = traced
    trace_id = secrets.token_hex(16)
    answer = _submit(base, images.png_with_corrupt_pixels(), trace_id)
    assert answer.status_code == 202, answer.text
    spans = _trace(collector, trace_id, {"cache lookup", "queue wait", "batch", "decode and preprocess"})
    assert "forward and gradcam" not in {s["name"] for s in spans}  # it failed decoding: no forward pass
    (ARTIFACTS / "trace-failed.txt").write_text(tree(spans) + "\n")


@pytest.mark.integration
def test_an_image_url_job_is_one_trace_through_its_fetch(traced):
    from tests.test_image_url import ImageServer

    base, collector, _ = traced
    server = ImageServer()
    try:
        trace_id = secrets.token_hex(16)
        answer = requests.post(f"{base}/api/v1/jobs", json={"image_url": server.url + "/good.png"}, timeout=30,
                               headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
        assert answer.status_code == 202, answer.text
        spans = _trace(collector, trace_id, {"fetch image_url", *WORKER_HOPS})
    finally:
        server.close()
    by_name = {span["name"]: span for span in spans}
    request = next(s for s in spans if s["service"] == "imgsvc-web" and s["name"].startswith("POST"))
    assert by_name["fetch image_url"]["parent"] == request["id"]
    assert by_name["fetch image_url"]["service"] == "imgsvc-webhooks"
    assert by_name["queue wait"]["parent"] == request["id"]  # the job's trace went on to the worker


@pytest.mark.parametrize("env, on", [
    ({}, False), ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True), ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_traces_are_on_only_where_the_standard_variables_ask(env, on):
    assert Settings.from_env(env).tracing is on


def test_with_tracing_off_no_process_loads_opentelemetry():
    """Off costs nothing: neither the web app, the worker nor the webhook worker loads the trace SDK,
    an exporter or an instrumentation (redis-py imports the OpenTelemetry API for its own opt-in
    metrics, which stay off)."""
    import subprocess
    import sys

    from shared.settings import REPO_ROOT

    code = ("import sys, web, worker.celery_app, webhooks.celery_app; from web import create_app; "
            "create_app(); print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
            "'opentelemetry.exporter', 'opentelemetry.instrumentation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                         env={"PATH": "/usr/bin:/bin", "WORKER_DEVICES": "cpu", "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_span_encoded_as_it_ends_is_what_the_sdk_exporter_would_send():
    """``shared.otlp`` writes each ended span's protobuf itself (nothing but bytes waits for export):
    byte for byte the SDK encoder's ``Span``, in a request the OTLP protobuf parser reads whole."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from shared import otlp

    class Keep(SpanProcessor):
        def __init__(self):
            self.ended = []

        def on_end(self, span):
            self.ended.append(span)

    resource, kept = Resource.create({"service.name": "encoded"}), Keep()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(kept)
    tracer = provider.get_tracer("imgsvc")
    caller = trace.SpanContext(int(secrets.token_hex(16), 16), int(secrets.token_hex(8), 16), is_remote=True,
                               trace_flags=trace.TraceFlags(1), trace_state=trace.TraceState([("vendor", "x")]))
    full = tracer.start_span("batch", context=trace.set_span_in_context(trace.NonRecordingSpan(caller)),
                             kind=trace.SpanKind.SERVER, links=[trace.Link(caller, {"n": 1})],
                             attributes={"s": "é", "i": -5, "f": 1.5, "b": False, "l": ["a", "b"], "n": [1, 2]})
    full.add_event("noted", {"e": "v"})
    full.record_exception(ValueError("boom"))
    full.set_status(trace.Status(trace.StatusCode.ERROR, "bad"))
    full.end()
    tracer.start_span("plain").end()
    for span in kept.ended:
        expected = encode_spans([span]).resource_spans[0].scope_spans[0].spans[0]
        assert otlp.encode_span(span) == expected.SerializeToString(deterministic=True)

    exporter = otlp.EncodedExporter(provider, None, endpoint="http://127.0.0.1:9/v1/traces")
    processor, queued = otlp.EncodingProcessor(exporter), []
    processor.queue = queued.append  # what the batch processor would hand the exporter
    for span in kept.ended:
        processor.on_end(span)
    request = ExportTraceServiceRequest.FromString(exporter.request(queued))
    expected = encode_spans(kept.ended).resource_spans[0]
    assert request.resource_spans[0].resource == expected.resource
    assert [s.scope for s in request.resource_spans[0].scope_spans] == [expected.scope_spans[0].scope] * 2
    assert [s for scoped in request.resource_spans[0].scope_spans for s in scoped.spans] == list(
        expected.scope_spans[0].spans)
    assert isinstance(request.resource_spans[0].scope_spans[0].spans[0], Span)
    processor.shutdown()


@pytest.mark.parametrize("name", ["always_on", "always_off", "traceidratio", "parentbased_always_on",
                                  "parentbased_always_off", "parentbased_traceidratio", "custom"])
def test_the_sdks_samplers_decide_here_as_they_decide_themselves(name, monkeypatch):
    """``shared.tracing`` decides the SDK's standard samplers without building the context objects they
    read (and asks any other): for new traces and for remote and local parents, sampled or not, the
    decision is the sampler's own."""
    from opentelemetry.sdk.trace import sampling

    from shared import tracing

    if name == "custom":  # not one of the standard compositions: asked each time
        sampler = sampling.ParentBased(sampling.ALWAYS_ON, remote_parent_sampled=sampling.ALWAYS_OFF)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.3")
        sampler = sampling._get_from_env_or_default()
    decide = tracing._sampling(sampler)

    def local(flags: int):
        span = tracing._Span()
        span.trace_id, span.span_id, span.flags, span.trace_state = 7, 9, flags, ""
        return span

    parents = [None, tracing._Remote(7, 9, 1), tracing._Remote(7, 9, 0), local(1), local(0)]
    decisions = set()
    for _ in range(300):
        trace_id = int(secrets.token_hex(16), 16)
        for parent in parents:
            expected = tracing._asked(sampler, parent, trace_id, "batch", 1, None)
            assert decide(parent, trace_id, "batch", 1, None) is expected, (parent, trace_id)
            decisions.add(expected)
    assert decisions == ({True} if name == "always_on" else {False} if name == "always_off" else {True, False})


def test_a_span_the_block_fails_in_is_exported_with_the_error_and_its_parent(monkeypatch):
    """``tracing.span``: a child of the given ``traceparent`` (kept when unsampled, so the context goes
    on), and an exception out of the block recorded as the SDK records one: an ``exception`` event
    and an error status, in the protobuf the exporter sends."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from shared import otlp, tracing

    provider, queued = TracerProvider(), []
    monkeypatch.setattr(tracing, "_tracer", tracing._Tracer(provider, queued.append))
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    with pytest.raises(ValueError), tracing.span("webhook attempt", parent=f"00-{trace_id}-{parent_id}-01",
                                                 attributes={"webhook.attempt": 1}) as attempt:
        attempt.set_attribute("http.response.status_code", 500)
        raise ValueError("refused")
    with tracing.span("webhook attempt", parent=f"00-{trace_id}-{parent_id}-00") as unsampled:
        assert tracing.traceparent_of(unsampled).endswith("-00")  # the receiver still gets the (unsampled) trace

    request = otlp.EncodedExporter(provider, InstrumentationScope("imgsvc"), endpoint="http://127.0.0.1:9").request
    (scoped,) = ExportTraceServiceRequest.FromString(request(queued)).resource_spans[0].scope_spans
    (span,) = scoped.spans
    assert scoped.scope.name == "imgsvc" and span.name == "webhook attempt"
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (trace_id, parent_id)
    assert span.status.code == span.status.STATUS_CODE_ERROR and span.status.message == "ValueError: refused"
    (event,) = span.events
    assert event.name == "exception" and {a.key: a.value.string_value for a in event.attributes}[
        "exception.type"] == "ValueError"
    assert {a.key: a.value.int_value for a in span.attributes} == {"webhook.attempt": 1,
                                                                   "http.response.status_code": 500}
