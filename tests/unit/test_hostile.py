"""Hostile payloads through the real servicer: arbitrary bytes, truncations, absurd
numbers, deep nesting, giant lines. The handler never raises (internal_errors stays 0), never
mutates the traffic (every reply is a plain CONTINUE, possibly with metadata), and every token
count it reports is a sane non-negative integer.
"""

from __future__ import annotations

import gzip

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.apis.base import MAX_TOKENS
from extproc.core.config import parse
from extproc.server.processor import Processor
from tests.unit.test_processor import body, headers, req_headers, run

# One representative path per API schema the router knows (extended as parsers are added).
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
    "/v1/messages",
    "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
    "/v1beta/models/gemini-2.0-flash:generateContent",
    "/model/anthropic.claude-3-haiku/converse-stream",
    "/model/amazon.nova-lite-v1%3A0/converse",
    "/v2/chat",
    "/api/chat",
    "/mcp",
]
CONTENT_TYPES = ["application/json", "text/event-stream", "application/x-ndjson", "application/vnd.amazon.eventstream", ""]


class Collect:
    def __init__(self) -> None:
        self.calls = []

    def on_call_end(self, call) -> None:
        self.calls.append(call)


def check(processor: Processor, replies: list[pb.ProcessingResponse], rec: Collect) -> None:
    assert processor.counters.internal_errors == 0
    assert processor.counters.active == 0
    for r in replies:
        kind = r.WhichOneof("response")
        assert kind != "immediate_response"
        common = getattr(r, kind).response
        assert not common.HasField("header_mutation") and not common.HasField("body_mutation")
        assert common.status == pb.CommonResponse.CONTINUE
    for call in rec.calls:
        u = call.obs.usage
        for v in (
            u.input_tokens,
            u.output_tokens,
            u.total_tokens,
            u.cached_input_tokens,
            u.reasoning_tokens,
            u.cache_creation_input_tokens,
        ):
            assert v is None or (type(v) is int and 0 <= v <= MAX_TOKENS)


def drive(path: str, ctype: str, chunks: list[bytes], encoding: str = "", request: bytes = b'{"model":"m","stream":true}') -> None:
    rec = Collect()
    p = Processor(parse({"limits": {"maxBodyBytes": 1 << 16, "maxEventBytes": 1 << 14, "maxDecodedBytes": 1 << 20}}), [rec])
    hdrs = {":status": "200", "content-type": ctype}
    if encoding:
        hdrs["content-encoding"] = encoding
    msgs = [req_headers(path), body("request_body", request, end=True), headers("response_headers", **hdrs)]
    msgs += [body("response_body", c) for c in chunks] + [body("response_body", b"", end=True)]
    check(p, run(p, msgs), rec)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), st.sampled_from(CONTENT_TYPES), st.lists(st.binary(max_size=300), max_size=8), st.binary(max_size=200))
def test_arbitrary_bytes(path, ctype, chunks, request):
    drive(path, ctype, chunks, request=request)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "usage",
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "input_tokens",
                    "output_tokens",
                    "model",
                    "choices",
                    "message",
                    "delta",
                    "usageMetadata",
                    "promptTokenCount",
                    "type",
                    "response",
                    "prompt_tokens_details",
                    "cached_tokens",
                    "error",
                    "id",
                    "metadata",
                    "inputTokens",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), st.sampled_from(CONTENT_TYPES), JSONISH, st.integers(min_value=1, max_value=64))
def test_schema_shaped_garbage(path, ctype, obj, cut):
    import orjson

    try:
        data = orjson.dumps(obj)
    except TypeError:  # integers beyond 64 bits: write them by hand, as a hostile server would
        data = repr(obj).replace("None", "null").replace("True", "true").replace("False", "false").replace("'", '"').encode()
    framed = b"data: " + data + b"\n\n" if ctype == "text/event-stream" else data + b"\n"
    drive(path, ctype, [framed[i : i + cut] for i in range(0, len(framed), cut)])


def test_deeply_nested_json():
    deep = b'{"usage":' * 100_000 + b"1" + b"}" * 100_000
    for path in PATHS:
        drive(path, "application/json", [deep])
        drive(path, "text/event-stream", [b"data: " + deep + b"\n\n"])


def test_megabyte_sse_lines_are_capped():
    line = b"data: " + b"x" * (3 << 20) + b"\n\n"
    for path in PATHS[:4]:
        drive(path, "text/event-stream", [line[i : i + 65536] for i in range(0, len(line), 65536)])


@pytest.mark.parametrize(
    "value", [b"1" + b"0" * 30, b"1e30", b"-5", b"3.5", b'"12"', b"true", b"9007199254740993", b"9007199254740991", b"1000000001"]
)  # 2**53 - 1 (once accepted); the bound + 1
def test_absurd_token_counts_are_refused(value):
    """A count above MAX_TOKENS (10^9 per count per call) is a parse error, not tokens: one
    provider reporting 2^53 - 1 once put $1.35e9 into ai_cost_usd_total."""
    rec = Collect()
    p = Processor(parse({}), [rec])
    payload = b'{"model":"m","usage":{"prompt_tokens":' + value + b',"completion_tokens":2}}'
    run(
        p,
        [
            req_headers(),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", payload, end=True),
        ],
    )
    (call,) = rec.calls
    assert call.obs.usage.input_tokens is None  # refused, not coerced
    assert call.obs.usage.output_tokens == 2
    assert call.obs.parse_error_reason == "bad_token_count"
    assert p.counters.internal_errors == 0


def test_gzip_bomb_is_abandoned_and_traffic_untouched():
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB
    rec = Collect()
    p = Processor(parse({"limits": {"maxDecodedBytes": 1 << 20}}), [rec])
    msgs = [
        req_headers(),
        headers("response_headers", **{":status": "200", "content-type": "application/json", "content-encoding": "gzip"}),
    ]
    msgs += [body("response_body", bomb[i : i + 16384]) for i in range(0, len(bomb), 16384)] + [body("response_body", b"", end=True)]
    check(p, run(p, msgs), rec)
    assert rec.calls[0].decode_error == "decoded_too_large"
