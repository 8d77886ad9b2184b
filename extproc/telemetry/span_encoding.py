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
from opentelemetry.trace import SpanContext

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
    if n < 0x4000:  # a span's length, most attribute values': two bytes, without the loop
        return bytes(((n & 0x7F) | 0x80, n >> 7))
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
# Whole ``KeyValue`` fields (tag and length included) by tag, then (key, type, value): most repeat
# from call to call (operation, provider, models, server, finish reasons, status, stream flag).
# The type is in the key because ``True == 1 == 1.0`` hash alike but encode apart; a float zero
# (``0.0 == -0.0``) and a sequence holding anything but strings are not kept. Bounded: values are
# chosen by clients and upstreams; a full table is emptied and refills with what recurs.
_ENTRIES_KEPT = 4096
_ENTRY_BYTES_KEPT = 256
_entries: dict[bytes, dict[tuple[str, type, Any], bytes]] = {}


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


def _entry(tag: bytes, k: str, v: Any, t: type) -> bytes:
    """One attribute as a repeated ``KeyValue`` field (the common value types written inline)."""
    key = _keys.get(k) or _key(k)
    if t is str:
        kv = key + _field(b"\x12", _field(b"\x0a", v.encode()))
    elif t is bool:
        kv = key + (b"\x12\x02\x10\x01" if v else b"\x12\x02\x10\x00")
    elif t is int and 0 <= v <= _INT64[1]:
        kv = key + _field(b"\x12", b"\x18" + _varint(v))
    elif t is float:
        kv = key + b"\x12\x09\x21" + _DOUBLE(v)
    else:
        kv = _key_value(key, v)
    return _field(tag, kv)


def attributes(tag: bytes, attrs: Mapping[str, Any] | None) -> bytes:
    """Repeated ``KeyValue`` fields; an attribute whose value cannot be encoded is left out."""
    if not attrs:
        return b""
    entries = _entries.get(tag)
    if entries is None:
        entries = _entries[tag] = {}
    out: list[bytes] = []
    append = out.append
    for k, v in attrs.items():
        t = type(v)
        if t is list:  # encoded as a tuple is (any sequence alike); a tuple can be a key
            v = tuple(v)
            t = tuple
        try:
            entry = entries.get((k, t, v))
        except TypeError:  # a sequence holding a mapping or a list: not hashable
            entry = None
            t = object  # not kept
        if entry is not None:
            append(entry)
            continue
        try:
            entry = _entry(tag, k, v, t)
        except Exception as error:  # as the SDK's encoder: logged, the attribute left out
            log.warning("span attribute %s not encoded: %s", k, error)
            continue
        append(entry)
        if len(entry) < _ENTRY_BYTES_KEPT and (
            t is str or t is int or t is bool or (t is float and v != 0.0) or (t is tuple and all(type(x) is str for x in v))
        ):
            if len(entries) >= _ENTRIES_KEPT:
                entries.clear()
            entries[(k, t, v)] = entry
    return b"".join(out)


def attribute(tag: bytes, k: str, v: Any) -> bytes:
    """One attribute as ``attributes(tag, {k: v})`` writes it (its kept entry, else written and
    kept by the same rules): for writers that walk a call's values without building the dict."""
    entries = _entries.get(tag)
    if entries is None:
        entries = _entries[tag] = {}
    t = type(v)
    if t is list:
        v = tuple(v)
        t = tuple
    try:
        entry = entries.get((k, t, v))
    except TypeError:
        entry = None
        t = object
    if entry is not None:
        return entry
    try:
        entry = _entry(tag, k, v, t)
    except Exception as error:
        log.warning("span attribute %s not encoded: %s", k, error)
        return b""
    if len(entry) < _ENTRY_BYTES_KEPT and (
        t is str or t is int or t is bool or (t is float and v != 0.0) or (t is tuple and all(type(x) is str for x in v))
    ):
        if len(entries) >= _ENTRIES_KEPT:
            entries.clear()
        entries[(k, t, v)] = entry
    return entry


def _span(s: ReadableSpan) -> bytes:
    if s.events or s.links:
        raise Unsupported
    ctx = s.context
    assert ctx is not None
    status = s.status
    return span(
        ctx.trace_id,
        ctx.span_id,
        ctx.trace_state,
        s.parent,
        s.name,
        s.kind.value,
        s.start_time,
        s.end_time,
        s.attributes,
        s.dropped_attributes,
        status.status_code.value,
        status.description,
    )


_names: dict[str, bytes] = {}
_STATUS = {0: b"\x7a\x00", 1: b"\x7a\x02\x18\x01", 2: b"\x7a\x02\x18\x02"}  # Status without a message, by code
_REMOTE = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)  # Span.flags
_NOT_REMOTE = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)
_KINDS = {k: b"\x30" + _varint(k + 1) for k in range(5)}  # Span.kind by the SDK's value (SPAN_KIND_INTERNAL = 1, ...)


def _name(name: str) -> bytes:
    """A span's name field, kept for the names that recur (operation and model), bounded."""
    b = _field(b"\x2a", name.encode())
    if len(_names) >= _ENTRIES_KEPT:
        _names.clear()
    _names[name] = b
    return b


def span(
    trace_id: int,
    span_id: int,
    trace_state: Mapping[str, str] | None,
    parent: SpanContext | None,
    name: str,
    kind: int,
    start: int | None,
    end: int | None,
    attrs: Mapping[str, Any] | bytes | None,
    dropped_attributes: int,
    code: int,
    description: str | None,
) -> bytes:
    """One ``ScopeSpans.spans`` field, from a span's parts (``kind``: the SDK's ``SpanKind`` value,
    ``code``: its ``StatusCode`` value), with no events or links: what ``encode_spans`` writes for
    the ``ReadableSpan`` of those parts. ``attrs`` may be the attribute fields already written
    (``attributes(b"\\x4a", ...)``'s bytes)."""
    out = [b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big")]
    if trace_state:
        out.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in trace_state.items()).encode()))
    if parent:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    out += (_names.get(name) or _name(name), _KINDS.get(kind) or b"\x30" + _varint(kind + 1))
    if start:
        out += (b"\x39", _FIXED64(start))
    if end:
        out += (b"\x41", _FIXED64(end))
    out.append(attrs if isinstance(attrs, bytes) else attributes(b"\x4a", attrs))
    if dropped_attributes:
        out += (b"\x50", _varint(dropped_attributes))
    if description:
        out.append(_field(b"\x7a", _field(b"\x12", description.encode()) + (b"\x18" + _varint(code) if code else b"")))
    else:
        out.append(_STATUS[code] if code in _STATUS else _field(b"\x7a", b"\x18" + _varint(code) if code else b""))
    out.append(_REMOTE if parent is not None and parent.is_remote else _NOT_REMOTE)
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


class Request:
    """Requests for spans of one resource and instrumentation scope, the block that does not
    change written once: ``encode(spans)`` (``span`` results) is what ``encode_spans`` writes for
    those spans."""

    def __init__(self, resource: Resource, scope: InstrumentationScope | None) -> None:
        self._resource = _resource(resource)
        self._scope = _scope(scope)
        self._scope_tail = _field(b"\x1a", scope.schema_url.encode()) if scope is not None and scope.schema_url else b""
        self._resource_tail = _field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""

    def encode(self, spans: Sequence[bytes]) -> bytes:
        """One join (a batch's request is hundreds of kB: each copy of it costs page faults)."""
        if not spans:
            return b""
        scope_len = len(self._scope) + sum(map(len, spans)) + len(self._scope_tail)
        scope_head = b"\x12" + _varint(scope_len)  # ResourceSpans.scope_spans = 2
        n = len(self._resource) + len(scope_head) + scope_len + len(self._resource_tail)
        return b"".join((b"\x0a", _varint(n), self._resource, scope_head, self._scope, *spans, self._scope_tail, self._resource_tail))


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
