"""OpenTelemetry traces of a job through every hop, with the SDK and the standard ``OTEL_*`` variables.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``, or ``OTEL_TRACES_EXPORTER``)
asks for traces (``Settings.tracing``); off, nothing here imports OpenTelemetry and every call
is a no-op, so tracing costs nothing. On, each process exports over OTLP/HTTP (protobuf) in a
background batch; the sampler (``OTEL_TRACES_SAMPLER``, ``..._ARG``) and the service name
(``OTEL_SERVICE_NAME``) are the SDK's own settings.

The spans named below are made here, not through the SDK's ``Tracer``: a small span object that
asks the SDK's sampler (the standard ones decided here as they would decide, without building the
context objects they read) and id generator, and is encoded to OTLP protobuf when it ends
(``shared.otlp``); only those bytes wait in the SDK's batch processor for the exporter. The SDK's
``Tracer`` costs ~50 us per span with its export (locks, attribute validation, a context per
parent, an ended copy); this, ~10 us (BENCHMARKS.md). A span from another instrumentation, should
one be added, goes through the SDK and is exported with them; the spans here are not the API's
current span (``current_traceparent`` reads the request's).

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
import time
import traceback
from contextvars import ContextVar

log = logging.getLogger(__name__)
_tracer = None  # the process's _Tracer once configure() turned tracing on
_current: ContextVar = ContextVar("imgsvc_request_span", default=None)  # the web request's span
_SAMPLED, _RANDOM_TRACE_ID = 0x01, 0x02  # W3C trace flags
_INTERNAL, _SERVER = 1, 2  # OTLP span kinds


def configure(settings, service_name: str) -> bool:
    """Turn tracing on for this process where the settings ask for it; return whether it is on."""
    global _tracer
    if not settings.tracing or _tracer is not None:
        return _tracer is not None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from shared import otlp

    scope = InstrumentationScope("imgsvc")  # the spans made here
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = otlp.PrintedExporter(provider, scope)
    else:
        exporter = otlp.EncodedExporter(provider, scope)  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
    processor = otlp.EncodingProcessor(exporter)  # OTEL_BSP_*
    provider.add_span_processor(processor)  # spans of any other instrumentation
    trace.set_tracer_provider(provider)
    _tracer = _Tracer(provider, processor.queue)
    log.info("tracing on: %s spans exported by %s", resource.attributes["service.name"], type(exporter).__name__)
    return True


class _Remote:
    """A span context read from a ``traceparent`` (a span of another process)."""

    __slots__ = ("trace_id", "span_id", "flags", "trace_state")
    remote = True

    def __init__(self, trace_id: int, span_id: int, flags: int, trace_state: str = ""):
        self.trace_id, self.span_id, self.flags, self.trace_state = trace_id, span_id, flags, trace_state


class _Span:
    """A span of this process: what the OTLP ``Span`` message holds, encoded and queued when it ends
    (if sampled; an unsampled one only carries its context on)."""

    __slots__ = ("trace_id", "span_id", "flags", "trace_state", "parent_id", "remote_parent", "name", "kind",
                 "start", "attributes", "links", "events", "status", "ended")
    remote = False

    def set_attribute(self, key: str, value) -> None:
        if self.attributes is None:
            self.attributes = {}
        self.attributes[key] = value

    def failed(self, exc: BaseException) -> None:
        """Record ``exc`` as the SDK's ``record_exception`` and an error status would."""
        if not self.flags & _SAMPLED:
            return
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ in (None, "builtins") else f"{kind.__module__}.{kind.__qualname__}"
        self.events = ((time.time_ns(), "exception", {
            "exception.type": name, "exception.message": str(exc),
            "exception.stacktrace": "".join(traceback.format_exception(exc)), "exception.escaped": "False"}),)
        self.status = (2, f"{kind.__name__}: {exc}")

    def end(self, end_ns: int | None = None) -> None:
        if self.ended or not self.flags & _SAMPLED:
            return
        self.ended = True
        _tracer.emit(self, time.time_ns() if end_ns is None else end_ns)


class _Tracer:
    """Starts spans with the SDK provider's sampler and id generator; queues each ended one encoded."""

    def __init__(self, provider, queue):
        self._queue = queue  # the batch processor's: a span's fields, encoded in the exporter's thread
        self._sampled = _sampling(provider.sampler)
        ids = provider.id_generator
        self._new_span_id, self._new_trace_id = ids.generate_span_id, ids.generate_trace_id
        self._random_ids = _RANDOM_TRACE_ID if ids.is_trace_id_random() else 0

    def start(self, name: str, parent=None, *, kind: int = _INTERNAL, attributes: dict | None = None,
              links: tuple = (), start_ns: int | None = None) -> _Span:
        """A span, child of ``parent`` (a ``_Span`` or ``_Remote``; None: it begins a trace)."""
        span = _Span()
        if parent is None:
            span.trace_id, span.parent_id, span.remote_parent = self._new_trace_id(), 0, False
            span.trace_state, random_ids = "", self._random_ids
        else:
            span.trace_id, span.parent_id, span.remote_parent = parent.trace_id, parent.span_id, parent.remote
            span.trace_state, random_ids = parent.trace_state, parent.flags & _RANDOM_TRACE_ID
        sampled = self._sampled(parent, span.trace_id, name, kind, attributes)
        span.span_id, span.flags = self._new_span_id(), random_ids | (_SAMPLED if sampled else 0)
        span.name, span.kind, span.attributes, span.links, span.events = name, kind, attributes, links, ()
        span.start, span.status, span.ended = time.time_ns() if start_ns is None else start_ns, (0, ""), False
        return span

    def emit(self, span: _Span, end_ns: int) -> None:
        """Queue an ended span as ``shared.otlp.encode``'s arguments: a tuple of numbers, strings and
        tuples (and a dict of them), which the collector stops tracking at its first look."""
        self._queue((span.trace_id, span.span_id, span.parent_id, span.remote_parent, span.name, span.kind,
                     span.start, end_ns, span.attributes, span.trace_state, span.events, span.links, span.status))


def _sampling(sampler):
    """``sampled(parent, trace_id, name, kind, attributes)``: the decision of ``sampler``. The SDK's own
    samplers (always on/off, trace id ratio, parent-based on those) are decided here as they decide;
    any other is asked, with the context and arguments it reads."""
    from opentelemetry.sdk.trace import sampling

    def root_rule(root):
        if isinstance(root, sampling.StaticSampler):
            decided = root._decision.is_sampled()
            return lambda _trace_id: decided
        if isinstance(root, sampling.TraceIdRatioBased):
            bound, limit = root.bound, root.TRACE_ID_LIMIT
            return lambda trace_id: trace_id & limit < bound
        return None

    if isinstance(sampler, sampling.ParentBased):
        root = root_rule(sampler._root)
        follows = all(isinstance(s, sampling.StaticSampler) and s._decision.is_sampled() is value for s, value in (
            (sampler._remote_parent_sampled, True), (sampler._remote_parent_not_sampled, False),
            (sampler._local_parent_sampled, True), (sampler._local_parent_not_sampled, False)))
        if root is not None and follows:
            return lambda parent, trace_id, *_: root(trace_id) if parent is None else bool(parent.flags & _SAMPLED)
    elif (root := root_rule(sampler)) is not None:
        return lambda _parent, trace_id, *_: root(trace_id)
    return lambda parent, trace_id, name, kind, attributes: _asked(sampler, parent, trace_id, name, kind, attributes)


def _asked(sampler, parent, trace_id: int, name: str, kind: int, attributes) -> bool:
    from opentelemetry import trace

    context = None
    if parent is not None:
        found = trace.SpanContext(parent.trace_id, parent.span_id, is_remote=parent.remote,
                                  trace_flags=trace.TraceFlags(parent.flags),
                                  trace_state=trace.TraceState.from_header([parent.trace_state]))
        context = trace.set_span_in_context(trace.NonRecordingSpan(found))
    return sampler.should_sample(context, trace_id, name, trace.SpanKind(kind - 1), attributes).decision.is_sampled()


def enabled() -> bool:
    return _tracer is not None


def instrument_flask(app) -> None:
    """Give every request a server span that continues the caller's ``traceparent``, when tracing is on.

    Not OpenTelemetry's Flask instrumentation: measured on this app's submit, it cost 0.165 ms of CPU
    per request (WSGI attributes and HTTP metrics recorded whether the span is sampled or not),
    these hooks 0.055 ms with the SDK's spans, less with these (BENCHMARKS.md). Registered first, so
    the span covers the rate limit too.
    """
    if _tracer is None:
        return
    from flask import request

    def start_request_span():
        if request.path in _UNTRACED:
            return
        route = request.url_rule.rule if request.url_rule else request.path
        headers = request.headers
        caller = _caller(headers.get("traceparent"), headers.get("tracestate")) if "traceparent" in headers else None
        _current.set(_tracer.start(f"{request.method} {route}", caller, kind=_SERVER,
                                   attributes={"http.request.method": request.method, "http.route": route}))

    def note_status(response):
        if (span := _current.get()) is not None:
            span.set_attribute("http.response.status_code", response.status_code)
        return response

    def end_request_span(_exc):
        if (span := _current.get()) is not None:
            _current.set(None)
            span.end()

    app.before_request_funcs.setdefault(None, []).insert(0, start_request_span)
    app.after_request(note_status)
    app.teardown_request(end_request_span)


_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


def _caller(traceparent: str, tracestate: str | None):
    """A caller's span context, its ``tracestate`` validated as the W3C propagator does."""
    found = _span_context(traceparent.strip())
    if found is not None and tracestate:
        from opentelemetry.trace import TraceState

        found.trace_state = TraceState.from_header([tracestate]).to_header()
    return found


def current_traceparent() -> str:
    """The request span's context as a ``traceparent`` header value ("" when off or outside a request)."""
    return "" if _tracer is None else traceparent_of(_current.get())


def _span_context(traceparent: str):
    """The span context in a ``traceparent`` (one ``traceparent_of`` wrote in another process of the
    service, or a caller's), read with a split rather than the propagator's regular expression; None
    when invalid."""
    try:
        version, trace_id, span_id, flags = traceparent.split("-")
        if len(version) != 2 or version == "ff" or len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
            return None
        found = _Remote(int(trace_id, 16), int(span_id, 16), int(flags, 16))
    except ValueError:
        return None
    return found if found.trace_id and found.span_id else None


@contextlib.contextmanager
def span(name: str, *, parent: str | None = None, attributes: dict | None = None):
    """A span around the block, child of ``parent`` (a traceparent) or of the request's span. It is not
    made the current span (what runs inside takes its traceparent from ``traceparent_of``): an
    exception out of the block is recorded on it. Yields the span, or None when tracing is off or
    the request's span is not sampled (a child would not be either, so none is made)."""
    if _tracer is None:
        yield None
        return
    above = _current.get() if parent is None else _span_context(parent)
    if parent is None and above is not None and not above.flags & _SAMPLED:
        yield None  # under the request's unsampled span (a given parent's context goes on, unsampled)
        return
    current = _tracer.start(name, above, attributes=attributes)
    try:
        yield current
    except Exception as exc:
        current.failed(exc)
        raise
    finally:
        current.end()


def child(parent_span, name: str, *, start_s: float | None = None, attributes: dict | None = None):
    """Start a span under ``parent_span`` (None when tracing is off, there is no parent, or it is not sampled)."""
    if _tracer is None or parent_span is None or not parent_span.flags & _SAMPLED:
        return None
    return _tracer.start(name, parent_span, attributes=attributes,
                         start_ns=None if start_s is None else int(start_s * 1e9))


def finish(span_, end_s: float | None = None) -> None:
    """End a span from ``batch_started`` or ``child`` (at ``end_s``, unix seconds, when given)."""
    if span_ is not None:
        span_.end(None if end_s is None else int(end_s * 1e9))


def traceparent_of(span_) -> str:
    """A span's context as a ``traceparent`` value ("" for None)."""
    return "" if span_ is None else f"00-{span_.trace_id:032x}-{span_.span_id:016x}-{span_.flags:02x}"


def batch_started(parents: list[str], enqueued_at: list[float], taken_at: float, *, requested: int):
    """The span of a batch taken at ``taken_at`` (parented to its first job's trace, linked from the
    others), and each job's wait in the queue (in its own trace, linked to the batch). ``parents``:
    the jobs' traceparents; ``enqueued_at``: when each was accepted. None when tracing is off.

    Each traceparent is read once; a wait is made whole, with its times, in one go."""
    if _tracer is None:
        return None
    contexts = [_span_context(parent) if parent else None for parent in parents]
    batch = _tracer.start("batch", contexts[0],
                          links=tuple((found.trace_id, found.span_id, None, True) for found in contexts[1:] if found),
                          attributes={"batch.size": len(parents), "batch.requested": requested})
    to_batch, taken_ns = ((batch.trace_id, batch.span_id, None, False),), int(taken_at * 1e9)
    for found, at in zip(contexts, enqueued_at):
        if found is not None:
            _tracer.start("queue wait", found, links=to_batch, start_ns=int(at * 1e9)).end(taken_ns)
    return batch
