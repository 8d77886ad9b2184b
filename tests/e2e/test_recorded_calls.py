"""Recorded calls end to end: real Envoy + the sidecar + an upstream replaying recorded responses.

For each recording: the client receives exactly the recorded bytes, and Envoy's access log shows
the usage the provider reported (expected numbers are literals read off the recordings).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from extproc.core import config
from extproc.server.processor import Processor
from tests.support.harness import Stack
from tests.support.inproc_sidecar import InProcessSidecar
from tests.support.recordings import load

pytestmark = pytest.mark.integration


PASSTHROUGH = "/passthrough/"


@pytest.fixture(scope="module", params=["default", "fewer"])
def stack(request, tmp_path_factory, replay) -> Iterator[Stack]:
    """Both ext_proc processing modes: headers messages, and fewer messages (attributes). Paths
    under /passthrough/ go to the same upstream without the sidecar."""
    with Stack(tmp_path_factory.mktemp("spine"), replay.url, fewer_messages=request.param == "fewer", passthrough=(PASSTHROUGH,)) as s:
        yield s


def _post(stack: Stack, fixture: str, path: str | None = None, body: bytes | None = None, **headers: str) -> tuple[httpx.Response, dict]:
    rec = load(fixture)
    rid = str(uuid.uuid4())
    h = {"content-type": "application/json", "x-fixture": fixture, "x-request-id": rid, **headers}
    r = httpx.post(stack.url(path or rec.path), content=body if body is not None else rec.request_body, headers=h, timeout=20)
    return r, stack.log_entry(rid)


RESPONSES_REQ = b'{"model":"gpt-4o","input":"Tell me a three sentence bedtime story about a unicorn."}'
RESPONSES_STREAM_REQ = b'{"model":"gpt-4o","input":"hi","stream":true}'

# fixture, request path override, request body override,
#   (model, provider_model, provider, streaming, prompt, completion, total, cached, reasoning)
CASES = [
    ("aigw__chat-basic.yaml", None, None, ("gpt-5-nano", "gpt-5-nano-2025-08-07", "openai", False, 8, 377, 385, 0, 320)),
    ("aigw__chat-detailed-usage.yaml", None, None, ("gpt-5-nano", "gpt-5-nano-2025-08-07", "openai", False, 12, 100, 112, 0, 100)),
    ("aigw__chat-reasoning.yaml", None, None, ("gpt-5-nano", "gpt-5-nano-2025-08-07", "openai", False, 27, 267, 294, 0, 192)),
    ("aigw__chat-streaming-detailed-usage.yaml", None, None, ("gpt-5-nano", "gpt-5-nano-2025-08-07", "openai", True, 12, 100, 112, 0, 100)),
    ("aigw__completion-streaming-usage.yaml", None, None, ("babbage-002", "babbage:2023-07-21-v2", "openai", True, 31, 25, 56, None, None)),
    (
        "aigw__embeddings-dimensions.yaml",
        None,
        None,
        ("text-embedding-3-small", "text-embedding-3-small", "openai", False, 5, None, 5, None, None),
    ),
    ("aigw__azure-chat-basic.yaml", None, None, ("gpt-5-nano", "gpt-5-nano-2025-08-07", "azure", False, 8, 271, 279, 0, 192)),
    (
        "agw__openai__responses_basic.json",
        "/v1/responses",
        RESPONSES_REQ,
        ("gpt-4o", "gpt-4o-2024-08-06", "openai", False, 10, 10, 20, 0, 0),
    ),
    ("agw__openai__responses_stream.sse", "/v1/responses", RESPONSES_STREAM_REQ, ("gpt-4o", None, "openai", True, 12, 8, 20, 0, 0)),
]


@pytest.mark.parametrize("fixture,path,body,expected", CASES, ids=[c[0] for c in CASES])
def test_recording_through_envoy(stack, fixture, path, body, expected):
    r, entry = _post(stack, fixture, path, body)
    rec = load(fixture)
    assert r.status_code == rec.status
    assert r.content == rec.body  # byte for byte what the upstream sent
    model, provider_model, provider, streaming, prompt, completion, total, cached, reasoning = expected
    assert entry["model"] == model
    if provider_model is not None:
        assert entry["provider_model"] == provider_model
    assert entry["provider"] == provider
    assert entry["streaming"] is streaming
    assert entry["prompt_tokens"] == prompt
    assert entry["completion_tokens"] == completion
    assert entry["total_tokens"] == total
    assert entry["cached_tokens"] == cached
    assert entry["reasoning_tokens"] == reasoning
    assert entry["response_code"] == rec.status


def test_streaming_without_usage_reports_no_tokens(stack):
    """chat-streaming was recorded without include_usage: no usage exists, none is invented."""
    r, entry = _post(stack, "aigw__chat-streaming.yaml")
    assert r.content == load("aigw__chat-streaming.yaml").body
    assert entry["streaming"] is True and entry["model"] == "gpt-5-nano"
    assert entry["provider_model"] == "gpt-5-nano-2025-08-07"
    assert entry["total_tokens"] is None and entry["prompt_tokens"] is None


def test_error_response_passes_through(stack):
    r, entry = _post(stack, "aigw__chat-bad-request.yaml")
    assert r.status_code == 400
    assert r.content == load("aigw__chat-bad-request.yaml").body
    assert entry["response_code"] == 400 and entry["total_tokens"] is None


def test_first_chunk_arrives_before_upstream_sends_last(stack, replay):
    """Streams are observed chunk by chunk, never held: the client reads the first event while the
    upstream is still holding back its last one."""
    gate = str(uuid.uuid4())
    rec = load("aigw__chat-streaming-detailed-usage.yaml")
    rid = str(uuid.uuid4())
    headers = {"content-type": "application/json", "x-fixture": rec.name, "x-gate": gate, "x-request-id": rid}
    with httpx.stream("POST", stack.url(rec.path), content=rec.request_body, headers=headers, timeout=20) as r:
        it = r.iter_raw()
        first = next(it)
        assert first.startswith(b"data: {")
        replay.open_gate(gate)
        rest = b"".join(it)
    assert first + rest == rec.body
    assert stack.log_entry(rid)["total_tokens"] == 112


def test_malformed_body_passes_through_and_is_counted(stack):
    """A truncated JSON body reaches the client untouched; the sidecar counts it, nothing raises."""
    bad = b'{"id":"x","model":"gpt-4o","usage":{"prompt_tokens":3,'
    rid = str(uuid.uuid4())
    r = httpx.post(
        stack.url("/v1/chat/completions"),
        content=b'{"model":"gpt-4o","messages":[]}',
        headers={"x-status": "200", "x-body": bad.decode(), "x-request-id": rid},
        timeout=10,
    )
    assert r.status_code == 200 and r.content == bad
    entry = stack.log_entry(rid)
    assert entry["model"] == "gpt-4o" and entry["total_tokens"] is None
    assert "Traceback" not in stack.sidecar_stderr()


def test_unknown_path_passes_through(stack):
    rid = str(uuid.uuid4())
    r = httpx.post(
        stack.url("/some/other/api"),
        content=b"hello",
        headers={"x-status": "200", "x-body": "plain", "x-content-type": "text/plain", "x-request-id": rid},
        timeout=10,
    )
    assert r.status_code == 200 and r.text == "plain"
    entry = stack.log_entry(rid)
    assert entry["operation"] == "unknown" and entry["total_tokens"] is None


def test_large_request_body_is_not_rejected(stack):
    """Over Envoy's 1 MiB buffer limit: no 413 (the request body is streamed to the sidecar)."""
    big = b'{"model":"gpt-5-nano","messages":[{"role":"user","content":"' + b"x" * (3 << 20) + b'"}]}'
    r, entry = _post(stack, "aigw__chat-basic.yaml", body=big)
    assert r.status_code == 200 and r.content == load("aigw__chat-basic.yaml").body
    assert entry["total_tokens"] == 385  # usage still read from the response


def test_openai_sdk_through_envoy(stack):
    openai = pytest.importorskip("openai")
    rid = str(uuid.uuid4())
    client = openai.OpenAI(base_url=stack.url("/v1"), api_key="sk-test-not-a-jwt", max_retries=0)
    resp = client.chat.completions.create(
        model="gpt-5-nano",
        messages=[{"role": "user", "content": "Hello!"}],
        extra_headers={"x-fixture": "aigw__chat-basic.yaml", "x-request-id": rid},
    )
    assert resp.usage.total_tokens == 385
    assert stack.log_entry(rid)["total_tokens"] == 385

    rid = str(uuid.uuid4())
    stream = client.chat.completions.create(
        model="gpt-5-nano",
        messages=[{"role": "developer", "content": "Hello, I'm a developer!"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fixture": "aigw__chat-streaming-detailed-usage.yaml", "x-request-id": rid},
    )
    usage = [c.usage for c in stream if c.usage]
    assert usage[0].total_tokens == 112
    entry = stack.log_entry(rid)
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (12, 100, 112)


def test_fail_open_when_sidecar_is_down(tmp_path, replay):
    with Stack(tmp_path, replay.url) as s:
        assert s.stop_sidecar(signal.SIGKILL) is not None
        time.sleep(0.2)
        for fixture in ("aigw__chat-basic.yaml", "aigw__chat-streaming-detailed-usage.yaml"):
            r, entry = _post(s, fixture)
            assert r.status_code == 200 and r.content == load(fixture).body
            assert entry["total_tokens"] is None  # unobserved, but served


class _SlowToEnd(Processor):
    """Answers Envoy's trailing empty end_of_stream message late, as a busy sidecar may: its
    worker's event loop is held for 0.3 s (well inside the message timeout) before the reply."""

    slowed = 0

    def open_stream(self, metadata=None):  # type: ignore[override]
        return _SlowEnd(self, super().open_stream(metadata))


class _SlowEnd:
    """An ext_proc stream (what ``Processor.open_stream`` returns) whose empty end of stream is
    handled late."""

    def __init__(self, processor: _SlowToEnd, stream) -> None:
        self.processor, self.stream = processor, stream

    def handle(self, req):
        if req.WhichOneof("request") == "response_body" and req.response_body.end_of_stream and not req.response_body.body:
            self.processor.slowed += 1
            time.sleep(0.3)
        return self.stream.handle(req)

    def handle_body_chunk(self, body):  # a streamed chunk read from its bytes: never the empty end
        return self.stream.handle_body_chunk(body)

    @property
    def end_stream(self) -> bool:
        return self.stream.end_stream

    @property
    def call(self):  # the server reads ``call.forwarded`` to read a chunk after Envoy's metadata context
        return self.stream.call

    def finish(self) -> None:
        self.stream.finish()


def test_usage_is_logged_when_the_client_closes_after_the_content_length(tmp_path, replay):
    """A non-streamed response from an HTTP/1.1 upstream reaches the sidecar as its data, then an
    empty end_of_stream message. The client has the whole body (Content-Length) once the data's
    reply is in, and a one-shot client closes then: Envoy resets the stream and writes the access
    log at once. The usage must already be in the metadata of the data's reply."""
    stack = Stack(tmp_path, replay.url, start_sidecar=False)
    sidecar = InProcessSidecar(config.parse({"listen": f"127.0.0.1:{stack.sidecar_port}"}), [], _SlowToEnd)
    try:
        with stack:
            # the body comes after the response-headers reply: Envoy streams it, then the end
            r, entry = _post(stack, "aigw__chat-basic.yaml", **{"x-body-delay-ms": "100"})
            assert r.status_code == 200 and r.content == load("aigw__chat-basic.yaml").body
            assert stack.envoy_stat("http.llm.ext_proc.message_timeouts") == 0
            assert sidecar.processor.slowed == 1  # the end of stream did come late
    finally:
        sidecar.close()
    assert entry["provider_model"] == "gpt-5-nano-2025-08-07"
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (8, 377, 385)


def _fewer(stack: Stack) -> bool:
    return "request_header_mode: SKIP" in stack.envoy_config_path.read_text()


def test_messages_per_call(stack):
    """A non-streamed call from this HTTP/1.1 upstream: 6 ext_proc messages (request headers, the
    request data and its empty end of stream, response headers, the response data and its empty
    end of stream; one fewer for each body Envoy reads with its end), or 4 (2 to 3) in
    fewer-messages mode (no headers messages). Envoy's counters."""
    name = "http.llm.ext_proc.stream_msgs_sent"
    before = stack.envoy_stat(name)
    r, entry = _post(stack, "aigw__chat-basic.yaml")
    assert r.status_code == 200 and entry["total_tokens"] == 385 and entry["outcome"] == "ok"
    assert stack.envoy_stat(name) - before in ((2, 3, 4) if _fewer(stack) else (4, 5, 6))


def test_passthrough_route_sends_no_ext_proc_messages(stack):
    """A passthrough route (ExtProcPerRoute disabled): zero ext_proc messages and streams, even for
    an LLM response, and the client gets the upstream's bytes; the LLM route beside it is still
    observed. In the fewer-messages mode this is how non-LLM paths avoid streaming through the
    sidecar (docs/performance.md)."""
    msgs, streams = "http.llm.ext_proc.stream_msgs_sent", "http.llm.ext_proc.streams_started"
    fixture = "aigw__chat-streaming-detailed-usage.yaml"
    rec = load(fixture)
    before = stack.envoy_stat(msgs), stack.envoy_stat(streams)
    r, entry = _post(stack, fixture, path=PASSTHROUGH + "v1/chat/completions")
    assert r.status_code == rec.status and r.content == rec.body
    assert entry["response_code"] == rec.status and entry["model"] is None and entry["total_tokens"] is None
    rid = str(uuid.uuid4())
    g = httpx.get(stack.url(PASSTHROUGH + "status"), headers={"x-status": "200", "x-body": "up", "x-request-id": rid}, timeout=10)
    assert g.status_code == 200 and g.text == "up" and stack.log_entry(rid)["outcome"] is None
    assert (stack.envoy_stat(msgs), stack.envoy_stat(streams)) == before

    r, entry = _post(stack, fixture)  # the same call on the observed route
    assert r.content == rec.body and entry["total_tokens"] == 112 and entry["outcome"] == "ok"
    assert stack.envoy_stat(msgs) > before[0] and stack.envoy_stat(streams) == before[1] + 1


def test_get_is_observed_by_path_status_and_method(stack):
    """A GET sends no request message in fewer-messages mode: the request line comes with the
    response's attributes, and the call is reported like in the default mode."""
    rid = str(uuid.uuid4())
    r = httpx.get(stack.url("/some/other/api"), headers={"x-status": "503", "x-body": "down", "x-request-id": rid}, timeout=10)
    assert r.status_code == 503 and r.text == "down"
    entry = stack.log_entry(rid)
    assert entry["outcome"] == "error" and entry["operation"] == "unknown"


def test_gzip_response_is_decoded(stack):
    """The content encoding reaches the sidecar in both modes (fewer messages: header_to_metadata
    copies it into metadata, read as a response attribute)."""
    r, entry = _post(stack, "aigw__chat-streaming-detailed-usage.yaml", **{"x-encode": "gzip", "accept-encoding": "gzip"})
    assert r.status_code == 200 and entry["total_tokens"] == 112 and entry["outcome"] == "ok"


def test_bodyless_response(stack):
    """A response without a body (204 here) sends no response message in fewer-messages mode: the
    call's status and outcome are then unknown to the sidecar (docs/performance.md)."""
    rid = str(uuid.uuid4())
    r = httpx.post(
        stack.url("/v1/chat/completions"),
        content=b'{"model":"gpt-4o","messages":[]}',
        headers={"x-status": "204", "x-request-id": rid},
        timeout=10,
    )
    assert r.status_code == 204
    entry = stack.log_entry(rid)
    assert entry["response_code"] == 204 and entry["model"] == ("gpt-4o" if not _fewer(stack) else None)
    assert entry["outcome"] == ("ok" if not _fewer(stack) else None)


def test_keep_alive_requests_all_reach_the_sidecar(stack):
    """Sequential POSTs on one keep-alive connection: every request body reaches the sidecar (the
    requested model is read from it), in both modes."""
    rec = load("aigw__chat-basic.yaml")
    rids = [str(uuid.uuid4()) for _ in range(20)]
    with httpx.Client(timeout=20) as client:
        for rid in rids:
            h = {"content-type": "application/json", "x-fixture": rec.name, "x-request-id": rid}
            assert client.post(stack.url(rec.path), content=rec.request_body, headers=h).status_code == 200
    assert [stack.log_entry(rid)["model"] for rid in rids] == ["gpt-5-nano"] * 20
