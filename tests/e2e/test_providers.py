"""Other providers and compressed streams through the real Envoy.

Each replayed recording reaches the client byte for byte (compressed streams: the exact encoded
bytes), and the access log shows the usage the recording holds (literals below).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from extproc.devtools.envoy_config import Upstream
from tests.support.harness import Stack, scrape, total
from tests.support.recordings import load
from tests.support.replay_upstream import _Encoder, split_stream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["default", "fewer"])
def stack(request, tmp_path_factory, replay) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("providers"), replay.url, fewer_messages=request.param == "fewer") as s:
        yield s


def _raw(stack: Stack, fixture: str, path: str, body: bytes, **headers: str) -> tuple[int, bytes, dict]:
    rid = str(uuid.uuid4())
    h = {"content-type": "application/json", "x-fixture": fixture, "x-request-id": rid, "accept-encoding": "identity", **headers}
    with httpx.stream("POST", stack.url(path), content=body, headers=h, timeout=20) as r:
        raw = b"".join(r.iter_raw())  # the bytes on the wire, not decoded
        status = r.status_code
    return status, raw, stack.log_entry(rid)


# fixture, path, request body, (provider, model, provider_model, prompt, completion, total, cached)
CASES = [
    (
        "agw__anthropic__stream_basic.sse",
        "/v1/messages",
        b'{"model":"claude-haiku-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}',
        ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5-20251001", 15, 21, 36, 0),
    ),
    (
        "agw__anthropic__stream_message_delta_usage.sse",
        "/v1/messages",
        b'{"model":"glm-5.2","max_tokens":64,"stream":true,"messages":[]}',
        ("anthropic", "glm-5.2", "glm-5.2", 3883 + 30464, 49, 3883 + 30464 + 49, 30464),
    ),  # input includes the cache read
    (
        "agw__gemini__stream_generate_content_sse.sse",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
        b'{"contents":[{"role":"user","parts":[{"text":"weather in Tokyo?"}]}]}',
        ("gemini", "gemini-2.5-pro", "gemini-2.5-pro", 15, 12, 27, None),
    ),
    (
        "agw__bedrock__converse_stream_basic.bin",
        "/model/amazon.titan-text-express-v1/converse-stream",
        b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}',
        ("bedrock", "amazon.titan-text-express-v1", None, 15, 142, 157, None),
    ),
]


@pytest.mark.parametrize("fixture,path,body,expected", CASES, ids=[c[0] for c in CASES])
def test_provider_stream_through_envoy(stack, fixture, path, body, expected):
    status, raw, entry = _raw(stack, fixture, path, body)
    assert status == 200 and raw == load(fixture).body
    provider, model, provider_model, prompt, completion, total, cached = expected
    assert entry["provider"] == provider and entry["model"] == model and entry["streaming"] is True
    if provider_model is not None:
        assert entry["provider_model"] == provider_model
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (prompt, completion, total)
    assert entry["cached_tokens"] == cached


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
def test_compressed_openai_stream_through_envoy(stack, encoding):
    rec = load("aigw__chat-streaming-detailed-usage.yaml")
    enc = _Encoder(encoding)
    expected_wire = b"".join(enc.chunk(c) for c in split_stream(rec.body, rec.content_type)) + enc.finish()
    status, raw, entry = _raw(stack, rec.name, rec.path, rec.request_body, **{"x-encode": encoding})
    assert status == 200 and raw == expected_wire  # the compressed bytes, untouched
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (12, 100, 112)
    assert entry["reasoning_tokens"] == 100


def test_compressed_json_through_envoy(stack):
    rec = load("aigw__chat-basic.yaml")
    status, raw, entry = _raw(stack, rec.name, rec.path, rec.request_body, **{"x-encode": "gzip"})
    import gzip

    assert status == 200 and gzip.decompress(raw) == rec.body
    assert entry["total_tokens"] == 385


@pytest.mark.parametrize("mode", ["default", "fewer"])
def test_model_in_path_route_without_request_body(tmp_path, replay, mode):
    """``Upstream(request_body=False)`` (per-route request_body_mode NONE): the sidecar never gets
    the request body, so one ext_proc message fewer, and still reports the call, model from the
    path and usage from the response. The evidence the body is not sent: the same unparsable body
    is a request parse error on a route with bodies, and none on this one."""
    fixture, body = "agw__gemini__generate_content_basic.json", b'{"contents": ['  # truncated JSON
    upstreams = [Upstream("/v1beta/models/gemini-2.5-pro:", replay.url, "gemini", request_body=False), Upstream("/", replay.url)]
    msgs = "http.llm.ext_proc.stream_msgs_sent"
    with Stack(tmp_path, replay.url, fewer_messages=mode == "fewer", upstreams=upstreams) as stack:

        def request_parse_errors() -> float:
            return total(scrape(stack.metrics_port), "ai_parse_errors_total", reason="request_json")

        before = stack.envoy_stat(msgs)
        status, raw, entry = _raw(stack, fixture, "/v1beta/models/gemini-2.5-pro:generateContent", body)
        assert status == 200 and raw == load(fixture).body
        assert (entry["provider"], entry["model"], entry["total_tokens"], entry["outcome"]) == ("gemini", "gemini-2.5-pro", 14, "ok")
        # request headers (default mode), response headers (default mode), the data and maybe
        # an empty end of stream: no request body message
        assert stack.envoy_stat(msgs) - before in ((1, 2) if mode == "fewer" else (3, 4))
        assert request_parse_errors() == 0

        status, raw, entry = _raw(stack, fixture, "/v1beta/models/gemini-2.5-flash:generateContent", body)
        assert status == 200 and entry["model"] == "gemini-2.5-flash" and entry["total_tokens"] == 14
        deadline = time.monotonic() + 10
        while request_parse_errors() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request_parse_errors() == 1  # the body route: the sidecar got (and failed to parse) it
