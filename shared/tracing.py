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


def configure(settings, service_name: str) -> bool:
    """Turn tracing on for this process where the settings ask for it; return whether it is on."""
    global _tracer, _propagator
    if not settings.tracing or _tracer is not None:
        return _tracer is not None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer, _propagator = trace.get_tracer("imgsvc"), TraceContextTextMapPropagator()
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
    from opentelemetry import context, trace

    def start_request_span():
        if request.path in _UNTRACED:
            return
        route = request.url_rule.rule if request.url_rule else request.path
        span = _tracer.start_span(f"{request.method} {route}", context=_propagator.extract(request.headers),
                                  kind=trace.SpanKind.SERVER,
                                  attributes={"http.request.method": request.method, "http.route": route})
        g.otel_request = (span, context.attach(trace.set_span_in_context(span)))

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
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def _context(traceparent: str):
    return _propagator.extract({"traceparent": traceparent}) if traceparent else None


def _link(span_or_traceparent):
    from opentelemetry import trace

    if isinstance(span_or_traceparent, str):
        context = trace.get_current_span(_context(span_or_traceparent)).get_span_context()
    else:
        context = span_or_traceparent.get_span_context()
    return trace.Link(context) if context.is_valid else None


@contextlib.contextmanager
def span(name: str, *, parent: str | None = None, attributes: dict | None = None):
    """A span around the block, child of ``parent`` (a traceparent) or of the current span; it is
    the current span inside the block. Yields the span, or None when tracing is off."""
    if _tracer is None:
        yield None
        return
    context = _context(parent) if parent is not None else None
    with _tracer.start_as_current_span(name, context=context, attributes=attributes) as current:
        yield current


def start(name: str, *, parent: str = "", links: tuple = (), start_s: float | None = None,
          attributes: dict | None = None):
    """Start a span that ends elsewhere (``finish``): in another thread, or at a time of its own.
    Its parent is ``parent`` (a traceparent; none: a new trace); ``links`` are traceparents or spans.
    Returns None when tracing is off."""
    if _tracer is None:
        return None
    linked = [link for link in (_link(item) for item in links if item) if link is not None]
    return _tracer.start_span(name, context=_context(parent), links=linked, attributes=attributes,
                              start_time=None if start_s is None else int(start_s * 1e9))


def child(parent_span, name: str, *, start_s: float | None = None, attributes: dict | None = None):
    """Start a span under ``parent_span`` (None when tracing is off or there is no parent)."""
    if _tracer is None or parent_span is None:
        return None
    from opentelemetry import trace

    return _tracer.start_span(name, context=trace.set_span_in_context(parent_span), attributes=attributes,
                              start_time=None if start_s is None else int(start_s * 1e9))


def finish(span_, end_s: float | None = None) -> None:
    """End a span from ``start`` or ``child`` (at ``end_s``, unix seconds, when given)."""
    if span_ is not None:
        span_.end(end_time=None if end_s is None else int(end_s * 1e9))


def traceparent_of(span_) -> str:
    """A span's context as a ``traceparent`` value ("" for None)."""
    if span_ is None:
        return ""
    from opentelemetry import trace

    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span_))
    return carrier.get("traceparent", "")


def record(name: str, *, parent: str, start_s: float, end_s: float, links: tuple = (),
           attributes: dict | None = None) -> None:
    """Record a span that already happened (the wait in the queue), under ``parent``."""
    if _tracer is not None and parent:
        finish(start(name, parent=parent, links=links, start_s=start_s, attributes=attributes), end_s)
