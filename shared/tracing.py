"""OpenTelemetry traces of a job through every hop, with the SDK and the standard ``OTEL_*`` variables.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``, or ``OTEL_TRACES_EXPORTER``)
asks for traces (``Settings.tracing``); off, nothing here imports OpenTelemetry and every call
is a no-op, so tracing costs nothing. On, each process exports over OTLP/HTTP (protobuf) in a
background batch; the sampler (``OTEL_TRACES_SAMPLER``, ``..._ARG``) and the service name
(``OTEL_SERVICE_NAME``) are the SDK's own settings.

A job's trace, as W3C ``traceparent`` text, travels with it: in its record (for the webhook
attempts) and in its broker message (for the worker). The spans of one job:

    POST /api/v1/jobs                        (web: the request's server span)
      cache lookup                           (web: answered from the cache, attached, or new)
      queue wait                             (worker: acceptance -> the batch that took it; links to the batch)
      batch                                  (worker: parented to its first job, linked from the others)
        decode and preprocess, forward and gradcam, write results
      webhook attempt                        (webhook worker: one per attempt; sends traceparent)
"""
from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)
_tracer = None  # the process's tracer once configure() turned tracing on
_propagator = None
_api = None  # opentelemetry.trace, once on
_NEW_TRACE = None  # an empty context: a span started in it begins a trace


def configure(settings, service_name: str) -> bool:
    """Turn tracing on for this process where the settings ask for it; return whether it is on."""
    global _tracer, _propagator, _api, _NEW_TRACE
    if not settings.tracing or _tracer is not None:
        return _tracer is not None
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    else:
        from shared.otlp import EncodedExporter, EncodingProcessor

        exporter = EncodedExporter(resource)  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
        provider.add_span_processor(EncodingProcessor(exporter))  # OTEL_BSP_*
    trace.set_tracer_provider(provider)
    _tracer, _propagator, _api, _NEW_TRACE = (trace.get_tracer("imgsvc"), TraceContextTextMapPropagator(), trace,
                                              Context())
    log.info("tracing on: %s spans exported by %s", resource.attributes["service.name"], type(exporter).__name__)
    return True


def enabled() -> bool:
    return _tracer is not None


def instrument_flask(app) -> None:
    """Give every request a server span that continues the caller's ``traceparent``, when tracing is on.

    Not OpenTelemetry's Flask instrumentation: measured on this app's submit, it cost 0.165 ms of CPU
    per request (WSGI attributes and HTTP metrics recorded whether the span is sampled or not),
    these hooks 0.055 ms (BENCHMARKS.md). Registered first, so the span covers the rate limit too.
    """
    if _tracer is None:
        return
    from flask import g, request
    from opentelemetry import context

    server = _api.SpanKind.SERVER

    def start_request_span():
        if request.path in _UNTRACED:
            return
        route = request.url_rule.rule if request.url_rule else request.path
        caller = _propagator.extract(request.headers) if "traceparent" in request.headers else None
        span = _tracer.start_span(f"{request.method} {route}", context=caller, kind=server,
                                  attributes={"http.request.method": request.method, "http.route": route})
        g.otel_request = (span, context.attach(_api.set_span_in_context(span)))

    def note_status(response):
        if "otel_request" in g:
            g.otel_request[0].set_attribute("http.response.status_code", response.status_code)
        return response

    def end_request_span(_exc):
        span, token = g.pop("otel_request", (None, None))
        if span is not None:
            context.detach(token)
            span.end()

    app.before_request_funcs.setdefault(None, []).insert(0, start_request_span)
    app.after_request(note_status)
    app.teardown_request(end_request_span)


_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


def current_traceparent() -> str:
    """The current span's context as a ``traceparent`` header value ("" when off or outside a trace)."""
    return "" if _tracer is None else _format(_api.get_current_span().get_span_context())


def _format(span_context) -> str:
    """A span context as W3C ``traceparent`` text (what the propagator's inject writes, without a carrier)."""
    if not span_context.is_valid:
        return ""
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"


def _span_context(traceparent: str):
    """The span context in a job's ``traceparent`` (written by ``_format`` in another process of the
    service), read with a split rather than the propagator's regular expression; None when invalid."""
    try:
        version, trace_id, span_id, flags = traceparent.split("-")
        if len(version) != 2 or version == "ff" or len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
            return None
        found = _api.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                 trace_flags=_api.TraceFlags(int(flags, 16)))
    except ValueError:
        return None
    return found if found.is_valid else None


def _unsampled(parent) -> bool:
    """Whether ``parent`` is a span of a trace that is not sampled: a child of it would not be either
    (the sampler follows the parent, or decides on the same trace id), so it is not made at all.
    The sampled flag, not ``is_recording()``: that is false too once the parent ended (a batch's
    write span may start after the batch span ended)."""
    found = parent.get_span_context()
    return found.is_valid and not found.trace_flags.sampled


def _in_context(span_context):
    """The context of a span started under ``span_context``: a new trace where it is None."""
    if span_context is None:
        return _NEW_TRACE
    return _api.set_span_in_context(_api.NonRecordingSpan(span_context))


@contextlib.contextmanager
def span(name: str, *, parent: str | None = None, attributes: dict | None = None):
    """A span around the block, child of ``parent`` (a traceparent) or of the current span. It is not
    made the current span (what runs inside takes its traceparent from ``traceparent_of``): an
    exception out of the block is recorded on it. Yields the span, or None when tracing is off."""
    if _tracer is None or (parent is None and _unsampled(_api.get_current_span())):
        yield None
        return
    current = _tracer.start_span(name, context=None if parent is None else _in_context(_span_context(parent)),
                                 attributes=attributes)
    try:
        yield current
    except Exception as exc:
        current.record_exception(exc)
        current.set_status(_api.Status(_api.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        current.end()


def child(parent_span, name: str, *, start_s: float | None = None, attributes: dict | None = None):
    """Start a span under ``parent_span`` (None when tracing is off, there is no parent, or it is not sampled)."""
    if _tracer is None or parent_span is None or _unsampled(parent_span):
        return None
    return _tracer.start_span(name, context=_api.set_span_in_context(parent_span), attributes=attributes,
                              start_time=None if start_s is None else int(start_s * 1e9))


def finish(span_, end_s: float | None = None) -> None:
    """End a span from ``batch_started`` or ``child`` (at ``end_s``, unix seconds, when given)."""
    if span_ is not None:
        span_.end(end_time=None if end_s is None else int(end_s * 1e9))


def traceparent_of(span_) -> str:
    """A span's context as a ``traceparent`` value ("" for None)."""
    return "" if span_ is None else _format(span_.get_span_context())


def batch_started(parents: list[str], enqueued_at: list[float], taken_at: float, *, requested: int):
    """The span of a batch taken at ``taken_at`` (parented to its first job's trace, linked from the
    others), and each job's wait in the queue (in its own trace, linked to the batch). ``parents``:
    the jobs' traceparents; ``enqueued_at``: when each was accepted. None when tracing is off.

    Each traceparent is read once; a wait is made whole, with its times, in one go."""
    if _tracer is None:
        return None
    contexts = [_span_context(parent) if parent else None for parent in parents]
    batch = _tracer.start_span("batch", context=_in_context(contexts[0]),
                               links=[_api.Link(found) for found in contexts[1:] if found is not None],
                               attributes={"batch.size": len(parents), "batch.requested": requested})
    batch_context, taken_ns = batch.get_span_context(), int(taken_at * 1e9)
    for found, at in zip(contexts, enqueued_at):
        if found is not None:
            _tracer.start_span("queue wait", context=_in_context(found), links=(_api.Link(batch_context),),
                               start_time=int(at * 1e9)).end(taken_ns)
    return batch

