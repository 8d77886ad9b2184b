"""The hand-written OTLP span encoding produces exactly the SDK encoder's request."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from extproc.core import config
from extproc.core.call import ERROR
from extproc.core.observation import Usage
from extproc.core.pricing import Cost
from extproc.telemetry import span_encoding
from extproc.telemetry.trace_export import EncodedSpans, build_exporter
from extproc.telemetry.tracing import Tracer, genai_attribute_bytes, span_attributes
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


@pytest.mark.parametrize(
    "kw", [{"start_time": None}, {"end_time": None}, {"start_time": None, "end_time": None}, {"kind": SpanKind.PRODUCER}]
)
def test_spans_without_times_and_every_kind_encode_as_the_sdk_does(kw):
    """The start and end are written together when both are set, each alone otherwise."""
    same([span({"a": 1}, **kw)])


@pytest.mark.parametrize("n", [0x7F, 0x80, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000])
def test_lengths_around_the_varint_byte_boundaries_encode_as_the_sdk_does(n):
    """A field's length in one, two (a span's usual size) or more bytes."""
    same([span({"content": "x" * n})])


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


def request(sent: bytes | ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """What the gRPC exporter's ``_translate_data`` returns, as the collector parses it."""
    return ExportTraceServiceRequest.FromString(sent) if isinstance(sent, bytes) else sent


def test_spans_with_events_are_left_to_the_sdks_encoder():
    s = span({"a": 1}, events=[Event("e", {"k": "v"}, timestamp=5)])
    with pytest.raises(span_encoding.Unsupported):
        span_encoding.encode_spans([s])
    exporter = build_exporter(config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing)
    try:
        assert request(exporter._translate_data([s])) == sdk_encode_spans([s])
    finally:
        exporter.shutdown()


def test_the_grpc_exporter_sends_the_hand_written_request(monkeypatch):
    """The exporter built from config is the SDK's, with this encoding: break the encoder and
    its requests change."""
    exporter = build_exporter(config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing)
    try:
        spans = [span(VALUES)]
        assert request(exporter._translate_data(spans)) == sdk_encode_spans(spans)
        monkeypatch.setattr(span_encoding, "encode_spans", lambda spans: b"")
        assert request(exporter._translate_data(spans)) == ExportTraceServiceRequest()
    finally:
        exporter.shutdown()


def _records(cfg: config.TracingConfig, calls: list) -> tuple[Tracer, list]:
    """A tracer's queued records for these calls, its span ids made fixed so that both ways of
    encoding a record give the same span."""
    t = Tracer(cfg, processor=SimpleSpanProcessor(InMemorySpanExporter()))
    records: list = []
    t._emit = records.append
    t.ids.generate_span_id = lambda: 0x1234  # type: ignore[method-assign]
    for c in calls:
        t.on_call_end(c)
    return t, records


@pytest.mark.parametrize("conventions", [["genai"], ["genai", "openinference", "langfuse", "openllmetry"]])
@pytest.mark.parametrize("capture", [False, True])
def test_records_encode_straight_as_the_sdk_encodes_their_spans(conventions, capture):
    """The OTLP/gRPC path writes the request from the queued records, never building the SDK's
    span: its bytes are what the SDK's encoder writes for ``readable_span(record)``, for a root
    span, an error, and a remote parent with trace state."""
    cfg = config.parse(
        {
            "tracing": {
                "otlpEndpoint": "127.0.0.1:1",
                "conventions": conventions,
                "captureContent": capture,
                "resourceAttributes": {"deployment.environment": "test"},
                "fields": {"add": {"team": 'request.headers["x-team"]', "total": "llm.total_tokens", "flag": "true"}},
            }
        }
    ).tracing
    ok, failed, child = call(capture=capture), call(capture=capture), call(capture=capture)
    failed.outcome, failed.status = ERROR, 500
    child.headers = {**child.headers, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=v1"}
    t, records = _records(cfg, [ok, failed, child])
    assert len(records) == 3
    encoded = t.encoded_spans(records)
    assert isinstance(encoded, EncodedSpans) and len(encoded) == 3
    assert ExportTraceServiceRequest.FromString(encoded.request) == sdk_encode_spans(t.readable_spans(records))
    t.shutdown()


def test_a_record_that_fails_to_encode_goes_to_the_sdks_encoder(monkeypatch):
    """In the same request as the records that encoded: the exporter appends the SDK's request."""
    cfg = config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing
    t, records = _records(cfg, [call(capture=False), call(capture=True)])
    first = t.encoded_span(records[0])

    def broken(*args: object) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(span_encoding, "span", broken)
    spans = t.encoded_spans([first, records[1]])
    assert isinstance(spans, EncodedSpans) and len(spans) == 2
    assert len(spans.spans) == 1 and isinstance(spans.spans[0], ReadableSpan)
    monkeypatch.undo()
    exporter = build_exporter(cfg)
    expected = ExportTraceServiceRequest()  # the spans left to the SDK in a ResourceSpans of their own
    expected.MergeFrom(sdk_encode_spans(t.readable_spans(records[:1])))
    expected.MergeFrom(sdk_encode_spans(t.readable_spans(records[1:])))
    try:
        assert len(expected.resource_spans) == 2
        assert request(exporter._translate_data(spans)) == expected
    finally:
        exporter.shutdown()
        t.shutdown()


def _grpc_records(cfg: config.TracingConfig, calls: list) -> tuple[Tracer, list]:
    """What a tracer exporting over OTLP/gRPC queues for these calls (span and trace ids fixed)."""
    t = Tracer(cfg)
    records: list = []
    t._emit = records.append
    t.ids.generate_span_id = lambda: 0x1234  # type: ignore[method-assign]
    t.ids.generate_trace_id = lambda: 0xABC  # type: ignore[method-assign]
    for c in calls:
        t.on_call_end(c)
    return t, records


def test_over_grpc_a_call_queues_its_span_already_written_as_the_sdk_writes_it():
    """The record queued at the call's end is the span's bytes (no container waits for the batch
    to fill, so the garbage collector never sees it), and the request built from them is what the
    SDK's encoder writes for the span the tuple record describes."""
    cfg = config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1", "conventions": ["genai", "openinference"]}}).tracing
    failed, child = call(capture=False), call(capture=False)
    failed.outcome, failed.status = ERROR, 500
    child.headers = {**child.headers, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=v1"}
    calls = [call(capture=False), failed, child]
    t, records = _grpc_records(cfg, calls)
    tuples, _ = _records(cfg, [])  # the same calls as tuple records (an SDK processor's tracer)
    tuples.ids.generate_trace_id = lambda: 0xABC  # type: ignore[method-assign]
    tuples, expected = _records_with(tuples, calls)
    try:
        assert [type(r) for r in records] == [bytes, bytes, bytes]
        encoded = t.encoded_spans(records)
        assert len(encoded) == 3 and not encoded.spans
        assert ExportTraceServiceRequest.FromString(encoded.request) == sdk_encode_spans(tuples.readable_spans(expected))
    finally:
        t.shutdown()
        tuples.shutdown()


def _records_with(t: Tracer, calls: list) -> tuple[Tracer, list]:
    records: list = []
    t._emit = records.append
    for c in calls:
        t.on_call_end(c)
    return t, records


def test_a_span_that_fails_to_encode_at_the_calls_end_is_queued_as_its_record(monkeypatch):
    cfg = config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing

    def broken(*args: object) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(span_encoding, "span", broken)
    t, records = _grpc_records(cfg, [call(capture=False)])
    try:
        assert len(records) == 1 and type(records[0]) is tuple
        monkeypatch.undo()
        assert t.encoded_spans(records).request == t.encoded_spans([t.encoded_span(records[0])]).request
    finally:
        t.shutdown()


def test_the_tracer_hands_the_grpc_exporter_encoded_batches_and_the_http_one_spans():
    grpc = Tracer(config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing)
    http = Tracer(config.parse({"tracing": {"otlpEndpoint": "http://127.0.0.1:1", "otlpProtocol": "http"}}).tracing)
    try:
        assert grpc.processor.prepare == grpc.encoded_spans and grpc.encodes
        assert http.processor.prepare == http.readable_spans and not http.encodes
    finally:
        grpc.shutdown()
        http.shutdown()


def test_the_collector_receives_the_encoded_request_through_the_sdks_exporter():
    """Encoded batches and SDK spans (events: the SDK's encoder) both reach a real OTLP/gRPC
    collector through the SDK's exporter, as the SDK's own encoder would have written them."""
    received: list[ExportTraceServiceRequest] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, req: ExportTraceServiceRequest, context: object) -> ExportTraceServiceResponse:  # noqa: N802
            received.append(req)
            return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cfg = config.parse({"tracing": {"otlpEndpoint": f"127.0.0.1:{port}"}}).tracing
    t, records = _records(cfg, [call(capture=True), call(capture=False)])
    exporter = build_exporter(cfg)
    try:
        with_event = span({"a": 1}, events=[Event("e", {"k": "v"}, timestamp=5)])
        assert exporter.export(t.encoded_spans(records)) is SpanExportResult.SUCCESS
        assert exporter.export([with_event, span(VALUES)]) is SpanExportResult.SUCCESS
        assert received == [sdk_encode_spans(t.readable_spans(records)), sdk_encode_spans([with_event, span(VALUES)])]
    finally:
        exporter.shutdown()
        t.shutdown()
        server.stop(None)


def test_repeated_values_encode_as_the_sdk_does_whatever_was_kept_before(monkeypatch):
    """Attributes are kept whole per (key, type, value), up to a bound: a value met again, values
    that compare equal across types (True, 1, 1.0; 0.0, -0.0; (1,), (True,)), and values met after
    the table filled all encode as the SDK does."""
    monkeypatch.setattr(span_encoding, "_entries", {})
    same([span({"k": "v", "m": "chat", "s": ("stop",), "n": 200, "f": 0.5, "b": False})] * 3)
    kept = span_encoding._entries[b"\x4a"]
    assert ("k", str, "v") in kept and ("s", tuple, ("stop",)) in kept and ("n", int, 200) in kept
    for value in (True, 1, 1.0, 0.0, -0.0, 0, False, (1,), (True,), (1.0,), ["stop"], ("stop",), "1", b"1"):
        same([span({"x": value}), span({"x": value})])
    same([span({"x": -0.0}), span({"x": 0.0}), span({"x": -0.0})])
    monkeypatch.setattr(span_encoding, "_ENTRIES_KEPT", 10)
    values = {f"key{i}": f"value{i}" for i in range(25)}
    same([span(values), span(values), span({"k": "v", "m": "chat"})])
    assert len(kept) <= 10


def _varied_calls() -> list:
    """Calls that differ in every way the GenAI attributes read: streamed or not, errors, cache
    tokens, no model, unicode, values past the 128-character cut, values the encoder leaves out,
    and calls sharing the leading attributes with different later ones."""
    calls = []

    def add(capture: bool = False, **changes) -> None:
        c = call(capture=capture)
        for k, v in changes.items():
            if k.startswith("obs_"):
                setattr(c.obs, k[4:], v)
            else:
                setattr(c, k, v)
        calls.append(c)

    add()
    add()  # the same again: the leading run kept
    add(capture=True)
    add(obs_streaming=True)  # streamed: time to first chunk
    add(obs_streaming=True, first_chunk=None)
    add(obs_streaming=1)  # an int where a bool was kept: written as an int
    add(obs_streaming=0)
    add(outcome=ERROR, status=500)
    add(outcome=ERROR, status=0)
    add(outcome="client_abort", status=None)
    add(obs_error_type="rate_limit_exceeded", status=429, outcome=ERROR)
    add(obs_usage=Usage(input_tokens=100, output_tokens=20, cached_input_tokens=80, cache_creation_input_tokens=15, reasoning_tokens=0))
    add(obs_usage=Usage())
    add(obs_usage=Usage(input_tokens=1 << 64, output_tokens=-3))  # out of int64: left out; negative
    add(obs_request_model=None, obs_response_model=None)
    add(obs_request_model=None)
    add(obs_response_model="gpt-4o")  # the same head but one model
    add(obs_request_model="модель-ü-模型-😀", obs_response_id="ид-😀", host="例え.jp")
    add(obs_request_model="m" * 300, obs_response_model="r" * 129, obs_response_id="i" * 5000, obs_operation="o" * 200)
    add(obs_response_id="bad \ud800 surrogate")  # not UTF-8: left out, as the SDK's encoder does
    add(obs_response_id=None, obs_finish_reasons=[], obs_params={})
    add(obs_finish_reasons=["stop", "length", "stop"] + [f"r{i}" for i in range(30)])
    add(obs_params={"max_tokens": 5, "max_completion_tokens": 7, "stop": ["a", "b"], "seed": 3, "top_k": 2.5, "n": True})
    add(obs_params={"stop": "x" * 400, "encoding_format": "float", "unknown": 1})
    add(cost=Cost(total=0.001, input=0.0004, output=0.0006, model="gpt-4o", source="catalogue"))
    add(cost=Cost(total=0.0, input=0.0, output=-0.0, model="gpt-4o", source="override"))
    add(provider="anthropic", api="anthropic.messages")
    add(provider="a-new-provider")
    add(end_user_header="u-1", session_id="s-2", key_id="k-3")
    add(obs_end_user="body-user", session_id="", key_id=None)
    add(host="[::1]:8080")
    add(host="127.0.0.1")
    add(host=None)
    add(capture=True, obs_output_text=["ü" * 3000], obs_input_messages=[{"role": "user", "content": "😀" * 2000}])
    return calls


@pytest.mark.parametrize("capture", [False, True])
def test_the_genai_attributes_written_in_one_pass_equal_the_encoded_dict(capture):
    """``genai_attribute_bytes`` (the call's end with the GenAI conventions alone) writes the bytes
    the encoder writes for ``span_attributes``' dict, for every kind of call, twice over (the
    second time from what the first kept)."""
    for _ in range(2):
        for c in _varied_calls():
            expected = span_encoding.attributes(b"\x4a", span_attributes(c, capture, 500))
            assert genai_attribute_bytes(c, capture, 500) == expected


def test_over_grpc_the_one_pass_spans_equal_the_encoded_dicts_spans():
    """The spans a GenAI-only tracer queues (attributes in one pass) are byte for byte those it
    queued from the attribute dict, and parse as the SDK's encoding of the same records."""
    cfg = config.parse({"tracing": {"otlpEndpoint": "127.0.0.1:1"}}).tracing
    calls = _varied_calls()
    calls[3].headers = {**calls[3].headers, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "v=1"}
    calls[4].headers = {**calls[4].headers, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    fast, records = _grpc_records(cfg, calls)
    slow = Tracer(cfg)
    slow.one_pass = False
    slow.ids.generate_span_id = lambda: 0x1234  # type: ignore[method-assign]
    slow.ids.generate_trace_id = lambda: 0xABC  # type: ignore[method-assign]
    slow, expected = _records_with(slow, calls)
    try:
        assert fast.one_pass
        assert len(records) == len(calls) - 1  # the unsampled parent's call is not traced
        assert all(type(r) is bytes for r in records)
        assert records == expected
    finally:
        fast.shutdown()
        slow.shutdown()
