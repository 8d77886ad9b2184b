"""Finished spans as a serialised OTLP ``ExportTraceServiceRequest``, written directly as bytes.

The SDK's encoder (``opentelemetry.exporter.otlp.proto.common``) builds a protobuf object per
attribute, value, span and level, each copied into its parent: ~70 us for a span of 20
attributes, the largest single cost of tracing a call. This writes the same message as bytes
(protobuf's wire format: a tag, a length, the payload), with each attribute key's bytes made
once; the gRPC exporter parses it back into its request object in C. ``tests/unit/test_span_encoding.py``
checks that the result equals the SDK's ``encode_spans`` for every kind of value and span.

Only what our spans hold is written here: spans with events or links raise
:class:`Unsupported` and the caller uses the SDK's encoder. A value the SDK's encoder cannot
encode (it logs it and leaves the attribute out) is left out here too.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("extproc.telemetry.tracing")

_INT64 = (-(1 << 63), (1 << 63) - 1)
_DOUBLE = struct.Struct("<d").pack
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags


class Unsupported(Exception):
    """A span this encoder does not write (events or links): use the SDK's encoder."""


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
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else _varint(n)) + payload


def _any_value(v: Any) -> bytes:
    """An ``AnyValue``'s payload, as the SDK's ``_encode_value`` chooses its case."""
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return _field(b"\x0a", v.encode())
    if isinstance(v, int):
        if not _INT64[0] <= v <= _INT64[1]:
            raise ValueError(f"{v} is out of int64 range")
        return b"\x18" + _varint(v if v >= 0 else v + (1 << 64))
    if isinstance(v, float):
        return b"\x21" + _DOUBLE(v)
    if isinstance(v, bytes):
        return _field(b"\x3a", v)
    if isinstance(v, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(x)) for x in v))
    if isinstance(v, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", _key_value(_key(str(k)), x)) for k, x in v.items()))
    raise TypeError(f"Invalid type {type(v)} of value {v}")


_keys: dict[str, bytes] = {}
# Whole ``KeyValue``s (length included) of short string values, by (key, value): most repeat from
# call to call (operation, provider, models, server, finish reasons). Bounded: values are chosen
# by clients and upstreams; once full, an entry is written each time.
_STRING_ENTRIES_KEPT = 4096
_string_entries: dict[tuple[str, str], bytes] = {}


def _key(k: str) -> bytes:
    """A ``KeyValue``'s key field (tag, length, UTF-8), made once per distinct key."""
    b = _keys.get(k)
    if b is None:
        b = _field(b"\x0a", k.encode())
        if len(_keys) < 4096:  # keys are our attribute names and configured field names
            _keys[k] = b
    return b


def _key_value(key: bytes, v: Any) -> bytes:
    return key + _field(b"\x12", _any_value(v))


def attributes(tag: bytes, attrs: Mapping[str, Any] | None) -> bytes:
    """Repeated ``KeyValue`` fields; an attribute whose value cannot be encoded is left out."""
    if not attrs:
        return b""
    out: list[bytes] = []
    append = out.append
    keys = _keys
    strings = _string_entries
    for k, v in attrs.items():
        t = type(v)
        if t is str:
            entry = strings.get((k, v))
            if entry is not None:
                append(tag + entry)
                continue
        key = keys.get(k) or _key(k)
        try:  # the common cases inline: a short string or a small int under a short key
            # (every length fits in one byte)
            if t is str:
                b = v.encode()
                n = len(b)
                if n < 126 and len(key) + n < 124:
                    entry = bytes((len(key) + n + 4,)) + key + b"\x12" + bytes((n + 2,)) + b"\x0a" + bytes((n,)) + b
                    if len(strings) < _STRING_ENTRIES_KEPT:
                        strings[(k, v)] = entry
                    append(tag + entry)
                    continue
            elif t is int and 0 <= v < 0x80 and len(key) < 122:
                append(tag + bytes((len(key) + 4,)) + key + b"\x12\x02\x18" + bytes((v,)))
                continue
            append(_field(tag, _key_value(key, v)))
        except Exception as error:  # as the SDK's encoder: logged, the attribute left out
            log.warning("span attribute %s not encoded: %s", k, error)
    return b"".join(out)


def _span(s: ReadableSpan) -> bytes:
    if s.events or s.links:
        raise Unsupported
    ctx = s.context
    assert ctx is not None
    parent = s.parent
    out = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08", ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
        out.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode()))
    if parent:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    out.append(_field(b"\x2a", s.name.encode()))
    out += (b"\x30", _varint(s.kind.value + 1))  # SPAN_KIND_INTERNAL = 1, ... (the SDK's value + 1)
    if s.start_time:
        out += (b"\x39", _FIXED64(s.start_time))
    if s.end_time:
        out += (b"\x41", _FIXED64(s.end_time))
    out.append(attributes(b"\x4a", s.attributes))
    if s.dropped_attributes:
        out += (b"\x50", _varint(s.dropped_attributes))
    status = s.status
    code = status.status_code.value
    desc = status.description
    out.append(_field(b"\x7a", (_field(b"\x12", desc.encode()) if desc else b"") + (b"\x18" + _varint(code) if code else b"")))
    out += (b"\x85\x01", _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE))
    return _field(b"\x12", b"".join(out))  # ScopeSpans.spans = 2


def _resource(r: Resource) -> bytes:
    return _field(b"\x0a", attributes(b"\x0a", r.attributes))  # ResourceSpans.resource = 1


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return _field(b"\x0a", b"")
    body = b""
    if scope.name:
        body += _field(b"\x0a", scope.name.encode())
    if scope.version:
        body += _field(b"\x12", scope.version.encode())
    body += attributes(b"\x1a", scope.attributes)
    return _field(b"\x0a", body)  # ScopeSpans.scope = 1


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` the SDK's ``encode_spans(spans)`` builds
    (spans grouped by resource, then instrumentation scope, in order of first appearance)."""
    groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    first = spans[0].resource if spans else None
    if all(s.resource is first for s in spans):  # ours: one Resource object (hashing one is a json.dumps)
        scopes: dict[InstrumentationScope | None, list[bytes]] = {}
        for s in spans:
            scopes.setdefault(s.instrumentation_scope or None, []).append(_span(s))
        if first is not None:
            groups[first] = scopes
    else:
        for s in spans:
            groups.setdefault(s.resource, {}).setdefault(s.instrumentation_scope or None, []).append(_span(s))
    out = []
    for resource, scopes in groups.items():
        body = [_resource(resource)]
        for scope, encoded in scopes.items():
            tail = _field(b"\x1a", scope.schema_url.encode()) if scope is not None and scope.schema_url else b""
            body.append(_field(b"\x12", _scope(scope) + b"".join(encoded) + tail))
        if resource.schema_url:
            body.append(_field(b"\x1a", resource.schema_url.encode()))
        out.append(_field(b"\x0a", b"".join(body)))
    return b"".join(out)
