"""The request body arrives in chunks (Envoy streams it, docs/envoy.md): the sidecar joins them,
bounded by ``limits.maxBodyBytes`` and counted in the worker's held bytes, and parses the whole
body once its last chunk arrived."""

from __future__ import annotations

from extproc.apis.base import Limits
from extproc.apis.openai import OpenAIChat
from extproc.core.config import parse
from extproc.core.observation import Observation
from extproc.server.processor import Processor
from tests.unit.test_processor import CHAT_JSON, Recorder, body, headers, meta, req_headers, run

REQUEST = b'{"model":"gpt-4o","stream":false,"max_tokens":77,"messages":[{"role":"user","content":"' + b"x" * 3000 + b'"}]}'


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_a_request_body_in_chunks_is_read_whole_once_its_last_arrives():
    obs = Observation()
    parser = OpenAIChat(obs)
    for piece in pieces(REQUEST, 1000):
        parser.feed_request(piece, complete=False)
        assert obs.request_model is None  # nothing parsed before the last chunk
    assert parser.held_bytes() == len(REQUEST)
    parser.feed_request(b"", complete=True)  # an HTTP/1.1 body's empty end-of-stream chunk
    assert obs.request_model == "gpt-4o" and obs.params.get("max_tokens") == 77
    assert obs.parse_errors == 0 and parser.held_bytes() == 0


def test_a_request_body_over_max_body_bytes_is_dropped_and_counted_once():
    obs = Observation()
    parser = OpenAIChat(obs)
    parser.limits = Limits(max_body_bytes=2048)
    for piece in pieces(REQUEST, 1000):
        parser.feed_request(piece, complete=False)
    parser.feed_request(b"", complete=True)
    assert obs.request_model is None and parser.held_bytes() == 0
    assert (obs.parse_errors, obs.parse_error_reason) == (1, "request_too_large")


def test_streamed_request_chunks_are_held_by_the_worker_until_the_body_ends():
    rec = Recorder()
    proc = Processor(parse({}), [rec])
    chunks = pieces(REQUEST, 1000)
    replies = run(
        proc,
        [
            req_headers(),
            *(body("request_body", c) for c in chunks),
            body("request_body", b"", end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", CHAT_JSON, end=True),
        ],
    )
    assert [r.WhichOneof("response") for r in replies].count("request_body") == len(chunks) + 1
    assert meta(replies[-2])["model"] == "gpt-4o"  # read from the joined request body
    assert proc.counters.large >= len(REQUEST) and proc.counters.held == 0
    (call,) = rec.calls
    assert call.obs.parse_errors == 0
