"""The hand-written OTLP span encoding produces exactly the SDK encoder's request."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from extproc.core import config
from extproc.core.call import ERROR
from extproc.telemetry import span_encoding
from extproc.telemetry.trace_export import build_exporter
from extproc.telemetry.tracing import Tracer
from tests.unit.test_tracing import call

RESOURCE = Resource({"service.name": "svc", "deployment.environment": "test", "n": 3})
SCOPE = InstrumentationScope("envoy-ai-extproc")
PARENT = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "v1"), ("other", "x=y")]),
)


def span(attributes: dict, **kw) -> ReadableSpan:
    base = dict(
        name="chat gpt-4o",
        resource=RESOURCE,
        kind=SpanKind.CLIENT,
        status=Status(StatusCode.OK),
        start_time=1_700_000_000_000_000_000,
        end_time=1_700_000_000_250_000_000,
        instrumentation_scope=SCOPE,
        context=SpanContext(PARENT.trace_id, 0x1234, is_remote=False, trace_flags=TraceFlags(1), trace_state=PARENT.trace_state),
        parent=PARENT,
    )
    return ReadableSpan(attributes=attributes, **{**base, **kw})


def same(spans: list[ReadableSpan]) -> None:
    ours = ExportTraceServiceRequest.FromString(span_encoding.encode_spans(spans))
    assert ours == sdk_encode_spans(spans)


VALUES = {
    "s": "text",
    "empty": "",
    "unicode": "h\u00e9llo \u2603 \U0001f600",
    "long": "x" * 300,
    "t": True,
    "f": False,
    "zero": 0,
    "i": 7,
    "big": (1 << 63) - 1,
    "neg": -5,
    "min": -(1 << 63),
    "pi": 3.25,
    "fzero": 0.0,
    "nfloat": -1e-300,
    "b": b"\x00\xff",
    "strs": ("a", "b"),
    "list": ["x", "y", "z"],
    "ints": (1, -2, 3),
    "floats": (0.5,),
    "bools": (True, False),
    "none_in_list": ("a", None),
    "no_items": (),
    "mapping": {"k": "v", "n": 1},
    "none": None,
}


def test_every_kind_of_value_encodes_as_the_sdk_does():
    same([span(VALUES)])


def test_a_value_the_sdk_cannot_encode_is_left_out_as_the_sdk_does():
    bad = {"ok": "yes", "object": object(), "huge": 1 << 64, "surrogate": "\udc80", "nested_bad": ["a", object()], "after": 1}
    same([span(bad)])
    ours = ExportTraceServiceRequest.FromString(span_encoding.encode_spans([span(bad)]))
    assert [kv.key for kv in ours.resource_spans[0].scope_spans[0].spans[0].attributes] == ["ok", "after"]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"parent": None},  # a root span
        {"parent": SpanContext(PARENT.trace_id, 9, is_remote=False)},  # a local parent
        {"status": Status(StatusCode.ERROR, "rate_limit_exceeded")},
        {"status": Status(StatusCode.ERROR)},
        {"status": Status(StatusCode.UNSET)},
        {"kind": SpanKind.INTERNAL},
        {"kind": SpanKind.SERVER},
        {"kind": SpanKind.CONSUMER},
        {"name": ""},
        {"context": SpanContext(1, 2, is_remote=False)},  # no trace state
        {"instrumentation_scope": None},
        {"instrumentation_scope": InstrumentationScope("lib", "1.2", "https://schema", {"a": 1})},
        {"resource": Resource({"service.name": "x"}, schema_url="https://schema/r")},
        {"resource": Resource({})},
    ],
)
def test_span_shapes_encode_as_the_sdk_does(kw):
    same([span({"a": 1}, **kw)])


def test_spans_group_by_resource_then_scope_in_order_of_appearance():
    same([])
    equal_but_distinct = Resource({"service.name": "svc", "deployment.environment": "test", "n": 3})
    same([span({"n": 1}), span({"n": 2}, resource=equal_but_distinct), span({"n": 3})])  # grouped as one, as the SDK does
    other = Resource({"service.name": "other"})
    lib = InstrumentationScope("lib")
    same(
        [
            span({"n": 1}),
            span({"n": 2}, resource=other),
            span({"n": 3}, instrumentation_scope=lib),
            span({"n": 4}),
            span({"n": 5}, resource=other, instrumentation_scope=lib),
        ]
    )


@pytest.mark.parametrize("conventions", [["genai"], ["genai", "openinference", "langfuse", "openllmetry"]])
@pytest.mark.parametrize("capture", [False, True])
def test_the_tracers_spans_encode_as_the_sdk_does(conventions, capture):
    cfg = config.parse(
        {
            "tracing": {
                "otlpEndpoint": "127.0.0.1:1",
                "conventions": conventions,
                "captureContent": capture,
                "fields": {"add": {"team": 'request.headers["x-team"]', "total": "llm.total_tokens"}},
            }
        }
    ).tracing
    spans: list[ReadableSpan] = []

    class Keep:
        def on_end(self, s: ReadableSpan) -> None:
            spans.append(s)

        def shutdown(self) -> None:
            pass

    t = Tracer(cfg, processor=Keep())
    ok, failed = call(capture=capture), call(capture=capture)
    failed.outcome, failed.status = ERROR, 500
    failed.headers = {**failed.headers, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=v1"}
    t.on_call_end(ok)
    t.on_call_end(failed)
    assert len(spans) == 2 and len(spans[0].attributes) > 15
    same(spans)
    t.shutdown()


def test_spans_with_events_are_left_to_the_sdks_encoder():
    s = span({"a": 1}, events=[Event("e", {"k": "v"}, timestamp=5)])
    with pytest.raises(span_encoding.Unsupported):
        span_encoding.encode_spans([s])
    exporter = build_exporter(config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing)
    try:
        assert exporter._translate_data([s]) == sdk_encode_spans([s])
    finally:
        exporter.shutdown()


def test_the_grpc_exporter_sends_the_hand_written_request(monkeypatch):
    """The exporter built from config is the SDK's, with this encoding: break the encoder and
    its requests change."""
    exporter = build_exporter(config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing)
    try:
        spans = [span(VALUES)]
        assert exporter._translate_data(spans) == sdk_encode_spans(spans)
        monkeypatch.setattr(span_encoding, "encode_spans", lambda spans: b"")
        assert exporter._translate_data(spans) == ExportTraceServiceRequest()
    finally:
        exporter.shutdown()


def test_repeated_and_uncached_string_values_encode_the_same(monkeypatch):
    """Short string values are kept whole per (key, value), up to a bound: a value met again and
    a value past the bound encode as the SDK does."""
    monkeypatch.setattr(span_encoding, "_string_entries", {})
    same([span({"k": "v", "m": "chat"})] * 3)
    assert ("k", "v") in span_encoding._string_entries
    kept = len(span_encoding._string_entries)
    monkeypatch.setattr(span_encoding, "_STRING_ENTRIES_KEPT", kept)
    values = {f"key{i}": f"value{i}" for i in range(50)}
    same([span(values), span(values)])
    assert len(span_encoding._string_entries) == kept
