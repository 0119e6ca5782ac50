"""Spans kept as plain values until their export, encoded to OTLP protobuf by hand, sent over OTLP/HTTP.

The SDK's batch processor keeps each ended span, with its dozen Python objects, in its export queue
until the batch goes (512 spans or 5 s): long enough for the garbage collector to move them to its
oldest generation, whose full collections they then bring nearer; and its exporter encodes a batch
through protobuf message objects (3-4 us per attribute). Here what waits in the queue is a tuple of
numbers and strings (``shared.tracing``'s spans: the collector stops tracking it at its first look)
or, for a span of the SDK (another instrumentation's), its bytes, encoded as it ended. The exporter's
thread writes the wire format itself: one ``ResourceSpans`` with the process's resource, a
``ScopeSpans`` of the tuples' spans and the SDK spans' own (a repeated protobuf field is its entries
written in turn), byte for byte what the SDK's encoder makes of the same spans, sent by the SDK's
own OTLP/HTTP exporter client: the standard ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers,
timeout, compression, certificates) and the batch processor's ``OTEL_BSP_*`` apply as before.
Loaded only when tracing is on.
"""
from __future__ import annotations

import struct
import sys
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes, _encode_instrumentation_scope
from opentelemetry.exporter.otlp.proto.http._common import RequestPayloadTooLargeError, _is_request_too_large
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PB2Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

_INT64 = (1 << 64) - 1
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags: what the SDK's encoder writes of the parent
_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_FLAGS = struct.Struct("<I").pack
_TIMES = struct.Struct("<BQBQ").pack  # start_time_unix_nano (field 7) and end_time_unix_nano (8), fixed64


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


def _value(value) -> bytes:
    """An ``AnyValue`` message (what the SDK's encoder makes of each attribute type)."""
    if value is None:
        return b""
    if value is True or value is False:
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value & _INT64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Mapping):
        return _field(b"\x32", _attributes(b"\x0a", value))
    return _field(b"\x2a", b"".join(_field(b"\x0a", _value(v)) for v in value))  # a sequence: ArrayValue


def _attributes(tag: bytes, attributes) -> bytes:
    """Each attribute as a ``KeyValue`` field ``tag``."""
    return b"".join(_field(tag, _field(b"\x0a", str(key).encode()) + _field(b"\x12", _value(value)))
                    for key, value in attributes.items()) if attributes else b""


def _flags(remote: bool) -> bytes:
    return _FLAGS(_HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE)


def encode(trace_id: int, span_id: int, parent_id: int, remote_parent: bool, name: str, kind: int, start: int,
           end: int, attributes=None, trace_state: str = "", events=(), links=(), status: tuple = (0, ""),
           dropped: tuple = (0, 0, 0)) -> bytes:
    """A ``Span`` message, the fields in the order the SDK's OTLP encoder writes them. ``parent_id`` 0:
    a root span; ``kind``: OTLP's (1 internal, 2 server); ``events``: (time, name, attributes) each;
    ``links``: (trace id, span id, attributes, remote) each; ``status``: (code, message)."""
    out = [b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big")]
    if trace_state:
        out.append(_field(b"\x1a", trace_state.encode()))
    if parent_id:
        out += (b"\x22\x08", parent_id.to_bytes(8, "big"))
    out += (_field(b"\x2a", name.encode()), b"\x30", _varint(kind), _TIMES(0x39, start, 0x41, end),
            _attributes(b"\x4a", attributes))
    for at, event, values in events:
        out.append(_field(b"\x5a", b"\x09" + _FIXED64(at) + _field(b"\x12", event.encode())
                          + _attributes(b"\x1a", values)))
    for linked_trace, linked_span, values, remote in links:
        out.append(_field(b"\x6a", b"".join((b"\x0a\x10", linked_trace.to_bytes(16, "big"), b"\x12\x08",
                                              linked_span.to_bytes(8, "big"), _attributes(b"\x22", values),
                                              b"\x35", _flags(remote)))))
    code, message = status
    out += (_field(b"\x7a", (_field(b"\x12", message.encode()) if message else b"")
                   + (b"\x18" + _varint(code) if code else b"")), b"\x85\x01", _flags(remote_parent))
    for tag, count in zip((b"\x50", b"\x60", b"\x70"), dropped):
        if count:
            out.append(tag + _varint(count))
    return b"".join(out)


def encode_span(span) -> bytes:
    """A ``Span`` message of an ended span of the SDK."""
    context, parent, status = span.context, span.parent, span.status
    return encode(context.trace_id, context.span_id, parent.span_id if parent is not None else 0,
                  parent is not None and parent.is_remote, span.name, span.kind.value + 1, span.start_time,
                  span.end_time, span.attributes,
                  trace_state=context.trace_state.to_header() if context.trace_state else "",
                  events=[(e.timestamp, e.name, e.attributes) for e in span.events],
                  links=[(k.context.trace_id, k.context.span_id, k.attributes, k.context.is_remote) for k in span.links],
                  status=(status.status_code.value, status.description or ""),
                  dropped=(span.dropped_attributes, span.dropped_events, span.dropped_links))


class _Requests:
    """``ExportTraceServiceRequest`` bytes of queued spans: each an SDK span's ``ScopeSpans`` (bytes),
    or the arguments of ``encode`` (a tuple) for a span of ``scope`` (``shared.tracing``'s, all in one
    ``ScopeSpans``). The resource is the provider's as it is now (a forked child's may differ from its
    parent's), encoded again only when it changed."""

    def __init__(self, provider, scope):
        self._provider, self._seen, self._resource = provider, None, b""
        self._scope = _scope_field(scope)

    def __call__(self, spans) -> bytes:
        if (resource := self._provider.resource) is not self._seen:
            encoded = PB2Resource(attributes=_encode_attributes(resource.attributes)).SerializeToString()
            self._resource = _field(b"\x0a", encoded) + (
                _field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b"")
            self._seen = resource
        scoped = [span for span in spans if type(span) is bytes]
        if ours := [_field(b"\x12", encode(*span)) for span in spans if type(span) is tuple]:
            scoped.append(_field(b"\x12", self._scope + b"".join(ours)))
        return _field(b"\x0a", self._resource + b"".join(scoped))  # ExportTraceServiceRequest.resource_spans


def _scope_field(scope) -> bytes:
    """A ``ScopeSpans``' scope and schema fields."""
    if scope is None:
        return b""
    encoded = _field(b"\x0a", _encode_instrumentation_scope(scope).SerializeToString())
    return encoded + (_field(b"\x1a", scope.schema_url.encode()) if scope.schema_url else b"")


class EncodedExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, sending what ``EncodingProcessor`` queued."""

    def __init__(self, provider, scope, **kwargs):
        super().__init__(**kwargs)
        self.request = _Requests(provider, scope)

    def export(self, spans) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            request = self.request(spans)
            if _is_request_too_large(request, self._max_request_size):  # as the SDK's export does
                result.error = RequestPayloadTooLargeError(f"span batch of {len(request)} bytes dropped")
                return SpanExportResult.FAILURE
            answer = self._client.export(request)
            if not answer.success:
                result.error = answer.error
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


class PrintedExporter(SpanExporter):
    """``OTEL_TRACES_EXPORTER=console``: each batch printed as OTLP JSON (what a collector's file exporter writes)."""

    def __init__(self, provider, scope):
        self.request = _Requests(provider, scope)

    def export(self, spans) -> SpanExportResult:
        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        sys.stdout.write(json_format.MessageToJson(ExportTraceServiceRequest.FromString(self.request(spans))) + "\n")
        sys.stdout.flush()
        return SpanExportResult.SUCCESS


class EncodingProcessor(SpanProcessor):
    """Queue each sampled span as it ends, in the SDK's batch processor: an SDK span encoded at once,
    a span of ``shared.tracing`` as the tuple ``queue`` is handed."""

    def __init__(self, exporter: EncodedExporter | PrintedExporter):
        self._batch = BatchSpanProcessor(exporter)  # OTEL_BSP_*: queue size, batch size, delay
        self.queue = self._batch._batch_processor.emit
        self._scopes: dict = {}  # instrumentation scope -> its encoded ``scope`` field

    def on_end(self, span) -> None:
        if span.context.trace_flags.sampled:
            scope = span.instrumentation_scope
            if (prefix := self._scopes.get(scope)) is None:
                prefix = self._scopes[scope] = _scope_field(scope)
            self.queue(_field(b"\x12", prefix + _field(b"\x12", encode_span(span))))

    def shutdown(self) -> None:
        self._batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)
