"""The servicer's state machine, driven directly with ext_proc messages (no Envoy)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc._pb.envoy_api import processing_mode_pb2 as mode_pb
from extproc.core.call import CLIENT_ABORT, ERROR, NO_RESPONSE, OK, Call
from extproc.core.config import parse
from extproc.server.processor import Processor
from tests.support.stream_driver import drive

NS = "ai.gateway.kgateway.dev"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    def on_call_end(self, call: Call) -> None:
        self.calls.append(call)


def headers(kind: str, end: bool = False, **hdrs: str) -> pb.ProcessingRequest:
    hm = pb.HttpHeaders(end_of_stream=end)
    for k, v in hdrs.items():
        hm.headers.headers.add(key=k.replace("_", "-") if not k.startswith(":") else k, raw_value=v.encode())
    return pb.ProcessingRequest(**{kind: hm})


def req_headers(path: str = "/v1/chat/completions", **extra: str) -> pb.ProcessingRequest:
    return headers("request_headers", **{":path": path, ":method": "POST", ":authority": "api.openai.com", **extra})


def body(kind: str, data: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(**{kind: pb.HttpBody(body=data, end_of_stream=end)})


def run(processor: Processor, messages: list[pb.ProcessingRequest], md: tuple = (), abort: bool = False) -> list[pb.ProcessingResponse]:
    """The parsed replies to ``messages`` on one stream. ``abort``: Envoy resets the stream after
    them (the server closes the stream then as when the messages end: the flag names the case)."""
    return [pb.ProcessingResponse.FromString(b) for b in drive(processor, messages, dict(md))]


def meta(reply: pb.ProcessingResponse) -> dict[str, Any]:
    return MessageToDict(reply.dynamic_metadata).get(NS, {})


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def proc(rec: Recorder) -> Processor:
    return Processor(parse({}), [rec])


CHAT_JSON = b'{"id":"c1","model":"gpt-4o-2024","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'


def test_non_streaming_chat(proc, rec):
    replies = run(
        proc,
        [
            req_headers(),
            body("request_body", b'{"model":"gpt-4o","messages":[]}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", CHAT_JSON[:40]),
            body("response_body", CHAT_JSON[40:], end=True),
        ],
    )
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
        "response_body",
    ]
    # the response body is switched to STREAMED for this response only
    assert replies[2].mode_override.response_body_mode == mode_pb.ProcessingMode.STREAMED
    # outcome: what ending now would amount to, until the response is complete
    assert meta(replies[2]) == {"provider": "openai", "streaming": False, "operation": "chat", "model": "gpt-4o", "outcome": "client_abort"}
    assert not replies[3].HasField("dynamic_metadata")  # nothing new yet: the constant reply
    m = meta(replies[4])
    assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"]) == (5, 7, 12)
    assert m["outcome"] == "ok"
    assert m["provider_model"] == "gpt-4o-2024"
    (call,) = rec.calls
    assert call.outcome == OK and call.status == 200 and proc.counters.active == 0


def _content_length_response(payload: bytes, status: str = "200", **extra: str) -> list[pb.ProcessingRequest]:
    """An HTTP/1.1 upstream's Content-Length response as Envoy streams it: the data, then an
    empty end_of_stream message of its own."""
    return [
        req_headers(),
        body("request_body", b'{"model":"gpt-4o","messages":[]}', end=True),
        headers(
            "response_headers", **{":status": status, "content-type": "application/json", "content-length": str(len(payload)), **extra}
        ),
        body("response_body", payload[:40]),
        body("response_body", payload[40:]),
    ]


def test_usage_is_sent_on_the_chunk_that_completes_the_content_length(proc, rec):
    """Envoy hands each chunk to the client on its reply. Once the client has Content-Length
    bytes it may close the connection; Envoy then resets the stream and writes the access log
    without waiting for the reply to the trailing empty end_of_stream message. So the metadata
    must come on the reply to the chunk that completes the body, not on the end_of_stream one."""
    replies = run(proc, [*_content_length_response(CHAT_JSON), body("response_body", b"", end=True)])
    assert not replies[3].HasField("dynamic_metadata")
    m = meta(replies[4])
    assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"]) == (5, 7, 12)
    assert m["provider_model"] == "gpt-4o-2024"
    assert replies[5] == pb.ProcessingResponse(response_body=pb.BodyResponse())  # nothing new: the constant
    (call,) = rec.calls
    assert call.outcome == OK and call.obs.usage.total_tokens == 12
    assert call.obs.parse_errors == 0 and call.response_bytes == len(CHAT_JSON)


def test_client_gone_after_the_content_length_is_a_complete_call(proc, rec):
    """Envoy resets the stream before the end_of_stream message: the call still completed."""
    run(proc, _content_length_response(CHAT_JSON), abort=True)
    bad = b'{"error":{"type":"invalid_request_error","message":"no such model, none at all"}}'
    run(proc, _content_length_response(bad, status="400"), abort=True)
    ok, err = rec.calls
    assert ok.outcome == OK and ok.obs.usage.total_tokens == 12
    assert err.outcome == ERROR and err.obs.error_type == "invalid_request_error"


def test_gzip_body_complete_by_content_length(proc, rec):
    """Content-Length counts the encoded bytes, which is what arrives."""
    import gzip

    replies = run(proc, _content_length_response(gzip.compress(CHAT_JSON), **{"content-encoding": "gzip"}))
    assert meta(replies[4])["total_tokens"] == 12 and rec.calls[0].decode_error is None


SSE = (
    b'data: {"id":"c","model":"m-1","choices":[{"delta":{"content":"a"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"c","model":"m-1","choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"c","model":"m-1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)


def test_stream_metadata_is_sent_on_the_usage_chunk_and_client_hangup_after_done_is_ok(proc, rec):
    """Clients hang up right after [DONE]; Envoy then never sends end_of_stream. The usage must
    already be in the metadata of the message that carried it, and the call counts as ok."""
    cut = SSE.index(b'data: {"id":"c","model":"m-1","choices":[],')
    replies = run(
        proc,
        [
            req_headers(),
            body("request_body", b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
            body("response_body", SSE[:cut]),
            body("response_body", SSE[cut:]),  # usage arrives here; no end_of_stream follows
        ],
        abort=True,
    )
    assert meta(replies[-1])["total_tokens"] == 7
    assert meta(replies[-1])["streaming"] is True
    assert meta(replies[-1])["outcome"] == "ok"  # the access log agrees with the counters
    assert rec.calls[0].outcome == OK
    assert rec.calls[0].obs.finish_reasons == ["stop"]


def test_abort_mid_stream_is_client_abort_counted_once(proc, rec):
    run(
        proc,
        [
            req_headers(),
            body("request_body", b'{"model":"m","stream":true}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
            body("response_body", SSE[:50]),
        ],
        abort=True,
    )
    assert len(rec.calls) == 1 and rec.calls[0].outcome == CLIENT_ABORT
    assert proc.counters.active == 0


def test_response_without_request_phase(proc, rec):
    """Envoy's own 401/403 reach the sidecar as response messages with no request phase."""
    replies = run(proc, [headers("response_headers", end=True, **{":status": "401"})])
    assert replies[0].WhichOneof("response") == "response_headers"
    assert replies[0].mode_override.response_body_mode == mode_pb.ProcessingMode.NONE
    assert rec.calls[0].outcome == ERROR and rec.calls[0].status == 401


def test_no_response_outcome(proc, rec):
    run(proc, [req_headers(), body("request_body", b"{}", end=True)])
    assert rec.calls[0].outcome == NO_RESPONSE


def test_unknown_path_skips_request_body(proc, rec):
    replies = run(proc, [req_headers("/healthz"), headers("response_headers", end=True, **{":status": "200"})])
    assert replies[0].mode_override.request_body_mode == mode_pb.ProcessingMode.NONE
    assert replies[1].mode_override.response_body_mode == mode_pb.ProcessingMode.NONE
    assert rec.calls[0].api == "unknown" and rec.calls[0].obs.operation == "unknown"


def test_observability_mode_sends_no_replies(proc, rec):
    msgs = [
        req_headers(),
        headers("response_headers", **{":status": "200", "content-type": "application/json"}),
        body("response_body", CHAT_JSON, end=True),
    ]
    for m in msgs:
        m.observability_mode = True
    assert run(proc, msgs) == []
    assert rec.calls[0].obs.usage.total_tokens == 12


def test_observability_mode_builds_no_metadata_and_prices_the_call_once_at_the_end(proc, rec, monkeypatch):
    """Envoy ignores the replies in observability mode: no metadata is priced or encoded per
    message, and the call the observers get costs what it costs with replies."""
    from extproc.server import processor as processor_mod

    def messages(observe: bool) -> list[pb.ProcessingRequest]:
        msgs = [
            req_headers(),
            body("request_body", b'{"model":"gpt-4o","messages":[]}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", CHAT_JSON[:40]),
            body("response_body", CHAT_JSON[40:], end=True),
        ]
        for m in msgs:
            m.observability_mode = observe
        return msgs

    run(proc, messages(False))
    encoded, priced = [], []
    real_encoded, real_price = processor_mod.metadata.encoded, proc.settings.pricer.price
    monkeypatch.setattr(processor_mod.metadata, "encoded", lambda *a: encoded.append(1) or real_encoded(*a))
    monkeypatch.setattr(proc.settings.pricer, "price", lambda *a: priced.append(1) or real_price(*a))
    assert run(proc, messages(True)) == []
    assert (encoded, priced) == ([], [1])
    replied, observed = rec.calls
    assert observed.cost == replied.cost and observed.cost.total > 0
    assert (observed.outcome, observed.obs.usage.total_tokens) == (replied.outcome, 12) == (OK, 12)


def test_provider_precedence(proc, rec):
    run(proc, [req_headers(**{"x-llm-provider": "from-header"})], md=(("x-llm-provider", "from-route"),))
    run(proc, [req_headers(**{"x-llm-provider": "from-header"})])
    run(proc, [req_headers("/openai/deployments/gpt4/chat/completions?api-version=1")])
    run(proc, [req_headers(**{":authority": "api.mistral.ai"})])
    assert [c.provider for c in rec.calls] == ["from-route", "from-header", "azure", "mistral"]
    assert rec.calls[2].obs.request_model == "gpt4"  # Azure deployment from the path


def test_internal_error_fails_open(proc, rec, monkeypatch, caplog):
    from extproc.apis import openai

    def boom(self, obj):
        raise RuntimeError("parser bug")

    monkeypatch.setattr(openai._ChatLike, "on_response_json", boom)
    replies = run(
        proc,
        [
            req_headers(),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", CHAT_JSON, end=True),
        ],
    )
    assert replies[-1].WhichOneof("response") == "response_body"  # still answered: CONTINUE
    assert proc.counters.internal_errors == 1 and rec.calls[0].obs.parse_errors == 1


def test_observer_failure_is_contained(rec):
    class Bad:
        def on_call_end(self, call):
            raise ValueError("observer bug")

    p = Processor(parse({}), [Bad(), rec])
    run(p, [req_headers(), headers("response_headers", end=True, **{":status": "200"})])
    assert len(rec.calls) == 1 and p.counters.internal_errors == 1


def test_gzip_response(proc, rec):
    import gzip

    data = gzip.compress(CHAT_JSON)
    run(
        proc,
        [
            req_headers(),
            headers("response_headers", **{":status": "200", "content-type": "application/json", "content-encoding": "gzip"}),
            body("response_body", data[:10]),
            body("response_body", data[10:], end=True),
        ],
    )
    assert rec.calls[0].obs.usage.total_tokens == 12 and rec.calls[0].decode_error is None


def test_jwt_claims_are_kept_from_forwarded_metadata(proc, rec):
    m = req_headers()
    m.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update({"principal": {"sub": "alice", "team": "dev"}})
    run(proc, [m, headers("response_headers", end=True, **{":status": "200"})])
    fwd = rec.calls[0].forwarded["envoy.filters.http.jwt_authn"]
    assert fwd.fields["principal"].struct_value.fields["team"].string_value == "dev"


def test_stream_closed_by_upstream_before_its_end_marker_is_an_error(proc, rec):
    """The upstream ended the response (end_of_stream) without [DONE] or the final usage."""
    cut = SSE.index(b'data: {"id":"c","model":"m-1","choices":[],')
    replies = run(
        proc,
        [
            req_headers(),
            body("request_body", b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
            body("response_body", SSE[:cut], end=True),
        ],
    )
    (call,) = rec.calls
    assert call.outcome == ERROR and call.obs.error_type == "incomplete_stream"
    assert meta(replies[-1])["outcome"] == "error"


def test_in_stream_error_event_is_an_error(proc, rec):
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude","usage":'
        b'{"input_tokens":9,"output_tokens":1}}}\n\n'
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    replies = run(
        proc,
        [
            req_headers("/v1/messages"),
            headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
            body("response_body", events),
        ],
        abort=True,
    )
    (call,) = rec.calls
    assert (call.outcome, call.obs.error_type) == (ERROR, "overloaded_error")
    assert meta(replies[-1])["outcome"] == "error"
    assert (call.obs.usage.input_tokens, call.obs.usage.output_tokens) == (9, None)  # placeholder not counted


def test_unknown_path_outcome_is_the_response(proc, rec):
    """A path no parser reads: its body is not observed, so the response headers settle it."""
    replies = run(proc, [req_headers("/some/api"), headers("response_headers", **{":status": "200"})], abort=True)
    assert rec.calls[0].outcome == OK and meta(replies[-1])["outcome"] == "ok"


@pytest.mark.parametrize("status", [b"\xb2", b"2\xb2\xb3", b"\xb9\xb2", "٢٠٠".encode(), b"2000000000000000000000", b"20x", b""])
def test_status_that_is_not_an_ascii_number_is_zero_without_raising(status):
    """The value is decoded as latin-1, where byte 0xB2 is "²": "²".isdigit() is True but
    int("²") raises, so a digit test alone would cost an internal error and a traceback per
    response."""
    rec = Recorder()
    p = Processor(parse({}), [rec])
    resp = headers("response_headers", True, **{"content-type": "application/json"})
    resp.response_headers.headers.headers.add(key=":status", raw_value=status)
    run(p, [req_headers(), resp])
    assert p.counters.internal_errors == 0
    assert rec.calls[0].status == 0


# ---- fewer-messages mode: no headers messages, attributes instead ------------------------------
def with_attrs(msg: pb.ProcessingRequest, **attrs: Any) -> pb.ProcessingRequest:
    s = msg.attributes["envoy.filters.http.ext_proc"]
    s.update(attrs)
    return msg


REQ_LINE = {"request.path": "/v1/chat/completions", "request.host": "api.openai.com", "request.method": "POST"}
RESP = {"response.code": 200, 'metadata.filter_metadata["envoy.ai.response_headers"]["content-type"]': "application/json"}


def test_fewer_messages_non_streaming_chat(proc, rec):
    replies = run(
        proc,
        [
            with_attrs(body("request_body", b'{"model":"gpt-4o","messages":[]}', end=True), **REQ_LINE),
            with_attrs(body("response_body", CHAT_JSON, end=True), **RESP, **REQ_LINE),
        ],
    )
    assert [r.WhichOneof("response") for r in replies] == ["request_body", "response_body"]
    m = meta(replies[1])
    assert (m["model"], m["provider_model"], m["total_tokens"], m["outcome"]) == ("gpt-4o", "gpt-4o-2024", 12, "ok")
    (call,) = rec.calls
    assert (call.outcome, call.status, call.method, call.host, call.api) == (OK, 200, "POST", "api.openai.com", "openai.chat")


def test_fewer_messages_http1_gzip_and_provider_header(proc, rec):
    import gzip

    data = gzip.compress(CHAT_JSON)
    enc = 'metadata.filter_metadata["envoy.ai.response_headers"]["content-encoding"]'
    replies = run(
        proc,
        [
            with_attrs(
                body("request_body", b'{"model":"gpt-4o","messages":[]}', end=True),
                **REQ_LINE,
                **{'request.headers["x-llm-provider"]': "azure"},
            ),
            with_attrs(body("response_body", data), **RESP, **{enc: "gzip"}),
            body("response_body", b"", end=True),
        ],
    )
    assert meta(replies[1])["outcome"] == "client_abort"  # the first response message hands over the metadata
    assert meta(replies[2])["total_tokens"] == 12 and meta(replies[2])["provider"] == "azure"
    assert rec.calls[0].outcome == OK


def test_fewer_messages_get_and_early_reply(proc, rec):
    """A GET sends no request message: the request line comes with the response. An upstream that
    answers before the request body: the late request body is not parsed into the response."""
    run(proc, [with_attrs(body("response_body", b"{}", end=True), **{**REQ_LINE, "request.method": "GET"}, **{"response.code": 404})])
    run(
        proc,
        [
            with_attrs(body("response_body", b'{"error":{"message":"x"}}', end=True), **REQ_LINE, **{"response.code": 429}),
            with_attrs(body("request_body", b'{"model":"gpt-4o"}', end=True), **REQ_LINE),
        ],
    )
    get, early = rec.calls
    assert (get.method, get.status, get.outcome) == ("GET", 404, ERROR)
    assert (early.status, early.outcome, early.api) == (429, ERROR, "openai.chat")


def test_fewer_messages_unknown_path_streams_through(proc, rec):
    replies = run(
        proc,
        [
            with_attrs(body("response_body", b"abc"), **{**REQ_LINE, "request.path": "/other"}, **{"response.code": 200}),
            body("response_body", b"def", end=True),
        ],
    )
    assert meta(replies[0])["outcome"] == "ok" and not replies[1].HasField("dynamic_metadata")
    assert rec.calls[0].outcome == OK and rec.calls[0].api == "unknown"


def test_fewer_messages_attribution_reads_the_listed_headers(proc, rec):
    run(
        proc,
        [
            with_attrs(
                body("request_body", b'{"model":"gpt-4o","messages":[]}', end=True),
                **REQ_LINE,
                **{'request.headers["x-session-id"]': "s-1"},
            ),
            with_attrs(body("response_body", CHAT_JSON, end=True), **RESP),
        ],
    )
    assert rec.calls[0].session_id == "s-1"
