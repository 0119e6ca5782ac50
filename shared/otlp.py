"""Spans encoded to OTLP protobuf as they end, and exported in batches of those bytes over OTLP/HTTP.

The SDK's batch processor keeps each ended span, with its dozen Python objects, in its export queue
until the batch goes (512 spans or 5 s): long enough for the garbage collector to move them to its
oldest generation, whose full collections they then bring nearer; the exporter encodes the batch
through protobuf message objects (3-4 us per attribute). Here a span is written straight to the wire
format of one ``ScopeSpans`` (its scope and the span) when it ends, and only those bytes wait in the
queue (bytes are not tracked by the collector). An export is the request's one ``ResourceSpans``: the
process's resource, encoded once, and the queued ``ScopeSpans`` one after the other (a repeated field
of protobuf is its entries written in turn), sent by the SDK's own OTLP/HTTP exporter client, so the
standard ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout, compression, certificates)
and the batch processor's ``OTEL_BSP_*`` apply as before. Loaded only when tracing is on.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes, _encode_instrumentation_scope
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PB2Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

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


def _flags(parent) -> bytes:
    return _FLAGS(_HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE)


def encode_span(span) -> bytes:
    """A ``Span`` message of an ended span (the fields the SDK's OTLP encoder writes)."""
    context, parent = span.context, span.parent
    out = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        out.append(_field(b"\x1a", context.trace_state.to_header().encode()))
    if parent is not None:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    out += (_field(b"\x2a", span.name.encode()), b"\x30", _varint(span.kind.value + 1),
            _TIMES(0x39, span.start_time, 0x41, span.end_time), _attributes(b"\x4a", span.attributes))
    for event in span.events:
        out.append(_field(b"\x5a", b"\x09" + _FIXED64(event.timestamp) + _field(b"\x12", event.name.encode())
                          + _attributes(b"\x1a", event.attributes)))
    for link in span.links:
        linked = link.context
        body = [b"\x0a\x10", linked.trace_id.to_bytes(16, "big"), b"\x12\x08", linked.span_id.to_bytes(8, "big")]
        body += (_attributes(b"\x22", link.attributes), b"\x35", _flags(linked))
        out.append(_field(b"\x6a", b"".join(body)))
    status = span.status
    message = _field(b"\x12", status.description.encode()) if status.description else b""
    code = b"\x18" + _varint(status.status_code.value) if status.status_code.value else b""
    out += (_field(b"\x7a", message + code), b"\x85\x01", _flags(parent))
    for tag, dropped in ((b"\x50", span.dropped_attributes), (b"\x60", span.dropped_events),
                         (b"\x70", span.dropped_links)):
        if dropped:
            out.append(tag + _varint(dropped))
    return b"".join(out)


class EncodedExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, sending ``ScopeSpans`` already encoded (``EncodingProcessor``)."""

    def __init__(self, resource, **kwargs):
        super().__init__(**kwargs)
        encoded = _field(b"\x0a", PB2Resource(attributes=_encode_attributes(resource.attributes)).SerializeToString())
        self._resource = encoded + (_field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b"")

    def export(self, spans) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        request = _field(b"\x0a", self._resource + b"".join(spans))  # ExportTraceServiceRequest.resource_spans
        with self._metrics.export_operation(len(spans)) as result:
            answer = self._client.export(request)
            if not answer.success:
                result.error = answer.error
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


class EncodingProcessor(SpanProcessor):
    """Encode each sampled span as it ends, and queue those bytes in the SDK's batch processor."""

    def __init__(self, exporter: EncodedExporter):
        self._batch = BatchSpanProcessor(exporter)  # OTEL_BSP_*: queue size, batch size, delay
        self._scopes: dict = {}  # instrumentation scope -> its encoded ``scope`` field

    def on_end(self, span) -> None:
        if span.context.trace_flags.sampled:
            self.emit(span.instrumentation_scope, encode_span(span))

    def emit(self, scope, span: bytes) -> None:
        """Queue one encoded ``Span`` of ``scope`` for export."""
        prefix = self._scopes.get(scope)
        if prefix is None:
            prefix = self._scopes[scope] = self._scope_field(scope)
        self._batch._batch_processor.emit(_field(b"\x12", prefix + _field(b"\x12", span)))

    @staticmethod
    def _scope_field(scope) -> bytes:
        if scope is None:
            return b""
        encoded = _field(b"\x0a", _encode_instrumentation_scope(scope).SerializeToString())
        return encoded + (_field(b"\x1a", scope.schema_url.encode()) if scope.schema_url else b"")

    def shutdown(self) -> None:
        self._batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)
