"""Response bodies with their ground-truth observations, shared by the parser tests.

Usage is expected in its normalised meaning (docs/metrics.md, Token semantics): input includes
cache reads and writes, output includes reasoning. Where an API reports them apart (Anthropic,
Bedrock: input; Gemini: output) the literal is written as the sum of the reported fields.

Recorded cases name a file in the provider fixtures; the expected numbers are literals read from
those recordings. Synthetic cases (marked ``recorded=False``) are built from each provider's
documented format where no recording exists.
"""

from __future__ import annotations

import base64
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.apis.base import ApiParser
from extproc.apis.routing import Router, default_routes
from extproc.core.observation import Observation
from tests.support import recordings

ROUTER = Router(default_routes())
SSE = "text/event-stream"
JSON = "application/json"
EVENTSTREAM = "application/vnd.amazon.eventstream"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Case:
    name: str
    path: str  # request path (routes the parser, gives the path model)
    content_type: str
    expect: dict[str, Any]  # Usage field -> value, plus "response_model"/"request_model"/...
    file: str | None = None  # fixture file (raw body, or a go-vcr cassette)
    body: bytes | None = None  # synthetic body
    status: int = 200
    request: bytes | None = None
    parser: str | None = None  # expected parser class name
    recorded: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    # Streams: a substring of the protocol unit (SSE event, NDJSON line, eventstream frame with its
    # base64 payload decoded, JSON-array element) whose arrival completes the response by the
    # API's end marker. Required for every streamed case (tests/unit/test_completion.py).
    complete_at: bytes | None = None

    def load(self) -> bytes:
        """The response body: the synthetic one, or the recording's (cassettes: the response)."""
        if self.body is not None:
            return self.body
        assert self.file is not None
        return recordings.load(self.file).body


def new_parser(case: Case, capture: bool = False) -> tuple[ApiParser, Observation]:
    match = ROUTER.resolve(case.path)
    assert match is not None, case.path
    if case.parser:
        assert match.parser.__name__ == case.parser
    obs = Observation()
    parser = match.parser(obs, path_model=match.path_model, capture=capture)
    if case.request is not None:
        parser.feed_request(case.request)
    parser.start_response(case.status, case.content_type)
    return parser, obs


def run(case: Case, chunks: list[bytes], capture: bool = False) -> Observation:
    parser, obs = new_parser(case, capture)
    for i, chunk in enumerate(chunks):
        parser.feed_response(chunk, i == len(chunks) - 1)
    if not chunks:
        parser.feed_response(b"", True)
    return obs


def summary(obs: Observation) -> dict[str, Any]:
    u = obs.usage
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "cached_input_tokens": u.cached_input_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "response_model": obs.response_model,
        "request_model": obs.request_model,
        "streaming": obs.streaming,
        "finish_reasons": obs.finish_reasons,
        "error_type": obs.error_type,
        "parse_errors": obs.parse_errors,
        "operation": obs.operation,
    }


def check(case: Case, obs: Observation) -> None:
    got = summary(obs)
    for key, want in case.expect.items():
        assert got[key] == want, f"{case.name}: {key} = {got[key]!r}, want {want!r}"
    if "parse_errors" not in case.expect:
        assert obs.parse_errors == 0, (case.name, obs.parse_error_reason)
    for key, want in case.extra.items():
        assert obs.extra.get(key) == want, (case.name, key, obs.extra.get(key))


# ---- AWS eventstream encoding (tests build frames the way AWS does) ------------------------
def frame(headers: dict[str, str], payload: bytes) -> bytes:
    block = b""
    for name, value in headers.items():
        raw = value.encode()
        block += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(raw)) + raw
    total = 12 + len(block) + len(payload) + 4
    prelude = struct.pack(">II", total, len(block))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + block + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, payload: Any) -> bytes:
    return frame(
        {":event-type": event_type, ":content-type": JSON, ":message-type": "event"},
        orjson.dumps(payload),
    )


def invoke_chunk(inner: Any) -> bytes:
    """An InvokeModelWithResponseStream ``chunk`` frame wrapping one model stream event."""
    return event_frame("chunk", {"bytes": base64.b64encode(orjson.dumps(inner)).decode()})


def sse(*events: tuple[str | None, Any]) -> bytes:
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"
    return out


def ndjson(*objs: Any) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


# ---- protocol units: where a stream can be cut between two whole messages ------------------
_SSE_END = re.compile(rb"\r?\n\r?\n")


def units(body: bytes, content_type: str) -> list[tuple[bytes, bytes]]:
    """The stream split into its protocol units, each as (raw bytes, readable view): SSE events,
    NDJSON lines, eventstream frames (view: event type + payload + the decoded ``bytes`` of an
    InvokeModel chunk), JSON-array elements (then the closing ``]``). Written
    apart from the sidecar's decoders, so tests do not check the code with itself."""
    ct = content_type.lower()
    cuts: list[int] = []
    views: dict[int, bytes] = {}
    if ct.startswith("text/event-stream"):
        cuts = [m.end() for m in _SSE_END.finditer(body)]
    elif "eventstream" in ct:
        i = 0
        while i + 12 <= len(body):
            total, hlen = struct.unpack(">II", body[i : i + 8])
            headers, payload = body[i + 12 : i + 12 + hlen], body[i + 12 + hlen : i + total - 4]
            view = _event_type(headers) + b" " + payload
            try:
                inner = orjson.loads(payload).get("bytes")
                if isinstance(inner, str):
                    view += b" " + base64.b64decode(inner)
            except (orjson.JSONDecodeError, AttributeError):
                pass
            i += total
            cuts.append(i)
            views[i] = view
    elif "ndjson" in ct or "stream+json" in ct:
        cuts = [m.end() for m in re.finditer(rb"\n", body)]
    else:  # a streamed JSON array
        depth, in_str, esc = 0, False, False
        for i, c in enumerate(body):
            if in_str:
                if esc:
                    esc = False
                elif c == 0x5C:
                    esc = True
                elif c == 0x22:
                    in_str = False
            elif c == 0x22:
                in_str = True
            elif c in (0x7B, 0x5B):
                depth += 1
            elif c in (0x7D, 0x5D):
                depth -= 1
                if depth == 1 and c == 0x7D:
                    cuts.append(i + 1)
    if cuts and cuts[-1] != len(body):
        cuts.append(len(body))
    out, start = [], 0
    for end in cuts:
        out.append((body[start:end], views.get(end, body[start:end])))
        start = end
    return out


def _event_type(headers: bytes) -> bytes:
    j = 0
    while j < len(headers):
        n = headers[j]
        name = headers[j + 1 : j + 1 + n]
        length = struct.unpack(">H", headers[j + 2 + n : j + 4 + n])[0]
        value = headers[j + 4 + n : j + 4 + n + length]
        if name == b":event-type":
            return value
        j += 4 + n + length
    return b""


def complete_offset(case: Case, body: bytes) -> int:
    """Bytes of ``body`` after which the response is complete: the end of the unit holding
    ``case.complete_at``."""
    assert case.complete_at is not None, case.name
    end = 0
    for raw, view in units(body, case.content_type):
        end += len(raw)
        if case.complete_at in view:
            # SSE: a lone CR ends a line, so "\r\n\r\n" dispatches the event at its second CR
            return end - 1 if raw.endswith(b"\r\n\r\n") else end
    raise AssertionError(f"{case.name}: no unit holds {case.complete_at!r}")


# ---- synthetic bodies from documented formats ----------------------------------------------
def _anthropic_stream(model: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "usage": {"input_tokens": 25, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 'Hello {"x": ['}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 40}},
        {"type": "message_stop"},
    ]


_GEMINI_ARRAY = (
    b"["
    + b",\r\n".join(
        orjson.dumps(o, option=orjson.OPT_INDENT_2)
        for o in (
            {
                "candidates": [{"content": {"role": "model", "parts": [{"text": 'Bra{ces] "and" \\ quotes'}]}}],
                "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
                "modelVersion": "gemini-2.0-flash-001",
            },
            {
                "candidates": [{"content": {"role": "model", "parts": [{"text": " more"}]}}],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12},
                "modelVersion": "gemini-2.0-flash-001",
            },
            {
                "candidates": [{"content": {"role": "model", "parts": [{"text": "."}]}, "finishReason": "STOP"}],
                "usageMetadata": {
                    "promptTokenCount": 9,
                    "candidatesTokenCount": 5,
                    "totalTokenCount": 20,
                    "cachedContentTokenCount": 4,
                    "thoughtsTokenCount": 6,
                },
                "modelVersion": "gemini-2.0-flash-001",
            },
        )
    )
    + b"]"
)

_GEMINI_CHUNKS = [orjson.loads(e) for e in _GEMINI_ARRAY[1:-1].split(b",\r\n")]
_GEMINI_SSE = b"".join(b"data: " + orjson.dumps(o) + b"\r\n\r\n" for o in _GEMINI_CHUNKS)

# Cohere v1 chat, streamed (documented shape): newline-delimited events, `stream-end` holds the response.
_COHERE_V1_META = {
    "api_version": {"version": "1"},
    "billed_units": {"input_tokens": 3, "output_tokens": 9},
    "tokens": {"input_tokens": 69, "output_tokens": 9},
}
_COHERE_V1_STREAM = b"".join(
    orjson.dumps(e) + b"\n"
    for e in [
        {"is_finished": False, "event_type": "stream-start", "generation_id": "g-1"},
        {"is_finished": False, "event_type": "text-generation", "text": "Hello"},
        {"is_finished": False, "event_type": "text-generation", "text": " there, stream-end"},
        {
            "is_finished": True,
            "event_type": "stream-end",
            "finish_reason": "COMPLETE",
            "response": {
                "response_id": "r-1",
                "text": "Hello there, stream-end",
                "generation_id": "g-1",
                "finish_reason": "COMPLETE",
                "meta": _COHERE_V1_META,
            },
        },
    ]
)
_COHERE_CHAT_SSE = sse(
    ("message-start", {"id": "c-1", "type": "message-start", "delta": {"message": {"role": "assistant"}}}),
    ("content-start", {"type": "content-start", "index": 0, "delta": {"message": {"content": {"type": "text", "text": ""}}}}),
    ("content-delta", {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Hi"}}}}),
    ("content-end", {"type": "content-end", "index": 0}),
    (
        "message-end",
        {
            "type": "message-end",
            "delta": {
                "finish_reason": "COMPLETE",
                "usage": {"billed_units": {"input_tokens": 5, "output_tokens": 2}, "tokens": {"input_tokens": 71, "output_tokens": 2}},
            },
        },
    ),
)

_OLLAMA_CHAT = ndjson(
    {"model": "llama3.2", "created_at": "2024-01-01T00:00:00Z", "message": {"role": "assistant", "content": "The"}, "done": False},
    {"model": "llama3.2", "created_at": "2024-01-01T00:00:00Z", "message": {"role": "assistant", "content": " sky"}, "done": False},
    {
        "model": "llama3.2",
        "created_at": "2024-01-01T00:00:01Z",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "total_duration": 4883583458,
        "prompt_eval_count": 26,
        "eval_count": 298,
        "eval_duration": 4799921000,
    },
)

_BEDROCK_INVOKE_CLAUDE = b"".join(
    [invoke_chunk(e) for e in _anthropic_stream("claude-3-5-sonnet-20240620")[:-1]]
    + [
        invoke_chunk(
            {
                "type": "message_stop",
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 999,
                    "outputTokenCount": 998,
                    "invocationLatency": 10,
                    "firstByteLatency": 5,
                },
            }
        )
    ]
)

CASES: list[Case] = [
    # -- Anthropic (recorded)
    Case(
        "anthropic_basic",
        "/v1/messages",
        JSON,
        file="agw__anthropic__basic.json",
        parser="AnthropicMessages",
        expect={
            "input_tokens": 15 + 12 + 13,
            "output_tokens": 21,
            "total_tokens": None,
            "cached_input_tokens": 12,
            "cache_creation_input_tokens": 13,
            "response_model": "claude-haiku-4-5-20251001",
            "finish_reasons": ["end_turn"],
            "streaming": False,
            "operation": "chat",
        },
    ),
    Case(
        "anthropic_stream_basic",
        "/v1/messages",
        SSE,
        file="agw__anthropic__stream_basic.sse",
        expect={
            "input_tokens": 15,
            "output_tokens": 21,
            "cached_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "response_model": "claude-haiku-4-5-20251001",
            "finish_reasons": ["end_turn"],
            "streaming": True,
        },
        complete_at=b'"message_delta"',
    ),
    Case(
        "anthropic_stream_thinking",
        "/v1/messages",
        SSE,
        file="agw__anthropic__stream_thinking.sse",
        expect={
            "input_tokens": 47,
            "output_tokens": 264,
            "reasoning_tokens": None,
            "response_model": "claude-opus-4-6",
            "finish_reasons": ["end_turn"],
        },
        complete_at=b'"message_delta"',
    ),
    Case(
        "anthropic_stream_message_delta_usage",
        "/v1/messages",
        SSE,
        file="agw__anthropic__stream_message_delta_usage.sse",
        expect={
            "input_tokens": 3883 + 30464,
            "output_tokens": 49,
            "cached_input_tokens": 30464,
            "cache_creation_input_tokens": 0,
            "response_model": "glm-5.2",
        },
        complete_at=b'"message_delta"',
    ),
    Case(
        "anthropic_count_tokens",
        "/v1/messages/count_tokens",
        JSON,
        body=b'{"input_tokens": 2095}',
        recorded=False,
        parser="AnthropicCountTokens",
        expect={"input_tokens": None, "operation": "count_tokens"},
        extra={"counted_input_tokens": 2095},
    ),
    # -- Gemini embeddings and token counting (synthetic: Google's documented response shapes)
    Case(
        "gemini_embed_content",
        "/v1beta/models/gemini-embedding-001:embedContent",
        JSON,
        body=b'{"embedding": {"values": [0.013, -0.008, 0.021]}}',
        recorded=False,
        parser="GeminiEmbed",
        request=b'{"content": {"parts": [{"text": "hello"}]}}',
        expect={"input_tokens": None, "operation": "embeddings", "request_model": "gemini-embedding-001"},
    ),
    Case(
        "vertex_embed_content_usage",
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-embedding-001:embedContent",
        JSON,
        body=b'{"embedding": {"values": [0.1, 0.2]}, "usageMetadata": {"promptTokenCount": 6, "totalTokenCount": 6}}',
        recorded=False,
        parser="GeminiEmbed",
        expect={"input_tokens": 6, "total_tokens": 6, "operation": "embeddings"},
    ),
    Case(
        "gemini_count_tokens",
        "/v1beta/models/gemini-2.5-flash:countTokens",
        JSON,
        body=b'{"totalTokens": 31, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 31}]}',
        recorded=False,
        parser="GeminiCountTokens",
        expect={"input_tokens": None, "operation": "count_tokens"},
        extra={"counted_input_tokens": 31},
    ),
    # -- Claude on Vertex AI (synthetic: Anthropic's documented stream, model from the path)
    Case(
        "vertex_anthropic_stream",
        "/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-3-5-sonnet-v2%4020241022:streamRawPredict",
        SSE,
        body=sse(*((e["type"], e) for e in _anthropic_stream("claude-3-5-sonnet-v2-20241022"))),
        request=b'{"anthropic_version": "vertex-2023-10-16", "stream": true, "max_tokens": 64, "messages": []}',
        recorded=False,
        parser="VertexAnthropic",
        expect={
            "input_tokens": 25 + 7 + 3,
            "output_tokens": 40,
            "cached_input_tokens": 7,
            "cache_creation_input_tokens": 3,
            "request_model": "claude-3-5-sonnet-v2@20241022",
            "response_model": "claude-3-5-sonnet-v2-20241022",
            "finish_reasons": ["max_tokens"],
            "streaming": True,
        },
        complete_at=b'"message_delta"',
    ),
    # -- Gemini / Vertex
    Case(
        "gemini_basic",
        "/v1beta/models/gemini-2.5-pro:generateContent",
        JSON,
        file="agw__gemini__generate_content_basic.json",
        parser="GeminiGenerate",
        expect={
            "input_tokens": 8,
            "output_tokens": 6,
            "total_tokens": 14,
            "response_model": "gemini-2.5-pro",
            "request_model": "gemini-2.5-pro",
            "finish_reasons": ["STOP"],
            "operation": "generate_content",
        },
    ),
    Case(
        "vertex_gemini_reasoning",
        "/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
        JSON,
        file="agw__gemini__generate_content_reasoning.json",
        parser="GeminiGenerate",
        expect={"input_tokens": 10, "output_tokens": 12 + 5, "total_tokens": 27, "reasoning_tokens": 5, "response_model": "gemini-2.5-pro"},
    ),
    Case(
        "gemini_stream_sse",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
        SSE,
        file="agw__gemini__stream_generate_content_sse.sse",
        parser="GeminiStream",
        expect={
            "input_tokens": 15,
            "output_tokens": 12,
            "total_tokens": 27,
            "response_model": "gemini-2.5-pro",
            "streaming": True,
            "finish_reasons": ["STOP"],
        },
        complete_at=b'"finishReason"',
    ),
    Case(
        "gemini_stream_sse_cumulative",
        "/v1beta/models/gemini-2.0-flash-001:streamGenerateContent?alt=sse",
        SSE,
        body=_GEMINI_SSE,
        recorded=False,
        parser="GeminiStream",
        expect={
            "input_tokens": 9,
            "output_tokens": 5 + 6,
            "total_tokens": 20,
            "cached_input_tokens": 4,
            "reasoning_tokens": 6,
            "response_model": "gemini-2.0-flash-001",
            "streaming": True,
            "finish_reasons": ["STOP"],
        },
        complete_at=b'"finishReason"',
    ),
    Case(
        "gemini_stream_json_array",
        "/v1beta1/projects/p1/locations/global/publishers/google/models/gemini-2.0-flash-001:streamGenerateContent",
        "application/json; charset=UTF-8",
        body=_GEMINI_ARRAY,
        recorded=False,
        parser="GeminiStream",
        expect={
            "input_tokens": 9,
            "output_tokens": 5 + 6,
            "total_tokens": 20,
            "cached_input_tokens": 4,
            "reasoning_tokens": 6,
            "response_model": "gemini-2.0-flash-001",
            "request_model": "gemini-2.0-flash-001",
            "streaming": True,
            "finish_reasons": ["STOP"],
        },
        complete_at=b'"finishReason"',
    ),
    # -- Bedrock
    Case(
        "bedrock_converse_basic",
        "/model/amazon.nova-lite-v1%3A0/converse",
        JSON,
        file="agw__bedrock__converse_basic.json",
        parser="BedrockConverse",
        expect={
            "input_tokens": 18,
            "output_tokens": 46,
            "total_tokens": 64,
            "request_model": "amazon.nova-lite-v1:0",
            "response_model": None,
            "finish_reasons": ["end_turn"],
            "streaming": False,
        },
    ),
    Case(
        "bedrock_converse_cache_write",
        "/model/anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse",
        JSON,
        file="agw__bedrock__converse_cache_write.json",
        expect={
            "input_tokens": 16 + 2387,
            "output_tokens": 9,
            "total_tokens": 2412,
            "cached_input_tokens": 0,
            "cache_creation_input_tokens": 2387,
        },
    ),
    Case(
        "bedrock_converse_stream",
        "/model/amazon.titan-text-express-v1/converse-stream",
        EVENTSTREAM,
        file="agw__bedrock__converse_stream_basic.bin",
        parser="BedrockConverse",
        expect={
            "input_tokens": 15,
            "output_tokens": 142,
            "total_tokens": 157,
            "streaming": True,
            "finish_reasons": ["end_turn"],
            "request_model": "amazon.titan-text-express-v1",
        },
        complete_at=b"metadata {",
    ),
    Case(
        "bedrock_invoke_stream_nova",
        "/model/amazon.nova-micro-v1%3A0/invoke-with-response-stream",
        EVENTSTREAM,
        file="agw__bedrock__invoke_with_response_stream.bin",
        parser="BedrockInvoke",
        expect={
            "input_tokens": 47,
            "output_tokens": 12,
            "total_tokens": None,
            "cached_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "streaming": True,
            "finish_reasons": ["end_turn"],
        },
        complete_at=b'{"metadata"',
    ),
    Case(
        "bedrock_invoke_stream_claude",
        "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke-with-response-stream",
        EVENTSTREAM,
        body=_BEDROCK_INVOKE_CLAUDE,
        recorded=False,
        expect={
            "input_tokens": 25 + 7 + 3,
            "output_tokens": 40,
            "cached_input_tokens": 7,
            "cache_creation_input_tokens": 3,
            "response_model": "claude-3-5-sonnet-20240620",
            "finish_reasons": ["max_tokens"],
            "request_model": "anthropic.claude-3-5-sonnet-20240620-v1:0",
        },
        complete_at=b'"message_delta"',
    ),
    Case(
        "bedrock_invoke_claude_json",
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke",
        JSON,
        body=orjson.dumps(
            {
                "id": "msg_bdrk_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-3-haiku-20240307",
                "content": [{"type": "text", "text": "Hi"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 12, "output_tokens": 6},
            }
        ),
        recorded=False,
        expect={"input_tokens": 12, "output_tokens": 6, "response_model": "claude-3-haiku-20240307"},
    ),
    # -- Cohere
    Case(
        "cohere_rerank",
        "/v2/rerank",
        JSON,
        file="agw__cohere__rerank.json",
        parser="CohereRerank",
        expect={"input_tokens": 214, "output_tokens": 2, "operation": "rerank"},
        extra={"billed_units": {"search_units": 1}},
    ),
    Case(
        "cohere_chat_json",
        "/v2/chat",
        JSON,
        recorded=False,
        parser="CohereChat",
        body=orjson.dumps(
            {
                "id": "c-2",
                "finish_reason": "COMPLETE",
                "message": {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                "usage": {"billed_units": {"input_tokens": 5, "output_tokens": 418}, "tokens": {"input_tokens": 71, "output_tokens": 418}},
            }
        ),
        request=b'{"model": "command-a-03-2025", "messages": [{"role": "user", "content": "hi"}]}',
        expect={
            "input_tokens": 71,
            "output_tokens": 418,
            "request_model": "command-a-03-2025",
            "finish_reasons": ["COMPLETE"],
            "streaming": False,
        },
        extra={"billed_units": {"input_tokens": 5, "output_tokens": 418}},
    ),
    Case(
        "cohere_chat_stream",
        "/v2/chat",
        SSE,
        body=_COHERE_CHAT_SSE,
        recorded=False,
        request=b'{"model": "command-r-plus", "stream": true, "messages": []}',
        expect={"input_tokens": 71, "output_tokens": 2, "streaming": True, "finish_reasons": ["COMPLETE"]},
        extra={"billed_units": {"input_tokens": 5, "output_tokens": 2}},
        complete_at=b'"message-end"',
    ),
    Case(
        "cohere_v1_chat_json",
        "/v1/chat",
        JSON,
        recorded=False,
        parser="CohereChatV1",
        body=orjson.dumps(
            {"response_id": "r-2", "text": "Hi", "generation_id": "g-2", "finish_reason": "COMPLETE", "meta": _COHERE_V1_META}
        ),
        request=b'{"model": "command-r", "message": "hi"}',
        expect={"input_tokens": 69, "output_tokens": 9, "request_model": "command-r", "finish_reasons": ["COMPLETE"], "streaming": False},
        extra={"billed_units": {"input_tokens": 3, "output_tokens": 9}},
    ),
    Case(
        "cohere_v1_chat_stream",
        "/v1/chat",
        "application/stream+json",
        body=_COHERE_V1_STREAM,
        recorded=False,
        parser="CohereChatV1",
        request=b'{"model": "command-r", "message": "hi", "stream": true}',
        expect={"input_tokens": 69, "output_tokens": 9, "streaming": True, "finish_reasons": ["COMPLETE"]},
        extra={"billed_units": {"input_tokens": 3, "output_tokens": 9}},
        complete_at=b'"stream-end"',
    ),
    Case(
        "cohere_embed",
        "/v2/embed",
        JSON,
        recorded=False,
        parser="CohereEmbed",
        body=orjson.dumps(
            {
                "id": "e-1",
                "embeddings": {"float": [[0.1, 0.2]]},
                "texts": ["hello"],
                "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 3}},
            }
        ),
        expect={"input_tokens": 3, "output_tokens": None, "operation": "embeddings"},
    ),
    # -- Ollama
    Case(
        "ollama_chat_stream",
        "/api/chat",
        NDJSON,
        body=_OLLAMA_CHAT,
        recorded=False,
        parser="OllamaChat",
        request=b'{"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]}',
        expect={
            "input_tokens": 26,
            "output_tokens": 298,
            "total_tokens": None,
            "response_model": "llama3.2",
            "request_model": "llama3.2",
            "streaming": True,
            "finish_reasons": ["stop"],
        },
        complete_at=b'"done":true',
    ),
    Case(
        "ollama_generate_json",
        "/api/generate",
        JSON,
        recorded=False,
        parser="OllamaGenerate",
        request=b'{"model": "llama3.2", "prompt": "hi", "stream": false}',
        body=orjson.dumps(
            {
                "model": "llama3.2",
                "created_at": "2024-01-01T00:00:00Z",
                "response": "Hello",
                "done": True,
                "done_reason": "stop",
                "prompt_eval_count": 26,
                "eval_count": 290,
            }
        ),
        expect={"input_tokens": 26, "output_tokens": 290, "streaming": False, "operation": "text_completion"},
    ),
    Case(
        "ollama_embed",
        "/api/embed",
        JSON,
        recorded=False,
        parser="OllamaEmbed",
        request=b'{"model": "all-minilm", "input": ["a", "b"]}',
        body=orjson.dumps(
            {
                "model": "all-minilm",
                "embeddings": [[0.01, 0.02]],
                "total_duration": 14143917,
                "load_duration": 1019500,
                "prompt_eval_count": 8,
            }
        ),
        expect={"input_tokens": 8, "response_model": "all-minilm", "streaming": False, "operation": "embeddings"},
    ),
    # -- OpenAI family (recorded)
    Case(
        "openai_responses_basic",
        "/v1/responses",
        JSON,
        file="agw__openai__responses_basic.json",
        expect={"input_tokens": 10, "output_tokens": 10, "total_tokens": 20, "response_model": "gpt-4o-2024-08-06"},
    ),
    Case(
        "openai_responses_stream",
        "/v1/responses",
        SSE,
        file="agw__openai__responses_stream.sse",
        expect={"input_tokens": 12, "output_tokens": 8, "total_tokens": 20, "response_model": "gpt-4.1-mini", "streaming": True},
        complete_at=b'"response.completed"',
    ),
    Case(
        "openai_chat_basic",
        "/v1/chat/completions",
        JSON,
        file="aigw__chat-basic.yaml",
        parser="OpenAIChat",
        expect={
            "input_tokens": 8,
            "output_tokens": 377,
            "total_tokens": 385,
            "reasoning_tokens": 320,
            "cached_input_tokens": 0,
            "response_model": "gpt-5-nano-2025-08-07",
        },
    ),
    Case(
        "openai_chat_stream_usage",
        "/v1/chat/completions",
        "text/event-stream; charset=utf-8",
        file="aigw__chat-streaming-detailed-usage.yaml",
        expect={
            "input_tokens": 12,
            "output_tokens": 100,
            "total_tokens": 112,
            "reasoning_tokens": 100,
            "response_model": "gpt-5-nano-2025-08-07",
            "streaming": True,
        },
        complete_at=b'"usage":{',
    ),
    Case(
        "openai_chat_stream_no_usage",
        "/v1/chat/completions",
        "text/event-stream; charset=utf-8",
        file="aigw__chat-streaming.yaml",
        expect={"input_tokens": None, "output_tokens": None, "response_model": "gpt-5-nano-2025-08-07", "finish_reasons": ["stop"]},
        complete_at=b"[DONE]",
    ),
    Case(
        "openai_completions_stream",
        "/v1/completions",
        SSE,
        file="aigw__completion-streaming-usage.yaml",
        parser="OpenAICompletions",
        expect={"input_tokens": 31, "output_tokens": 25, "total_tokens": 56, "response_model": "babbage:2023-07-21-v2"},
        complete_at=b'"usage":{',
    ),
    Case(
        "openai_embeddings",
        "/v1/embeddings",
        JSON,
        file="aigw__embeddings-dimensions.yaml",
        expect={"input_tokens": 5, "total_tokens": 5, "response_model": "text-embedding-3-small"},
    ),
    Case(
        "azure_chat",
        "/openai/deployments/gpt-5-nano/chat/completions",
        JSON,
        file="aigw__azure-chat-basic.yaml",
        expect={
            "input_tokens": 8,
            "output_tokens": 271,
            "total_tokens": 279,
            "reasoning_tokens": 192,
            "request_model": "gpt-5-nano",
            "response_model": "gpt-5-nano-2025-08-07",
        },
    ),
    Case(
        "gemini_openai_compat_total",
        "/v1beta/openai/chat/completions",
        JSON,
        file="agw__gemini_openai_compat__total_includes_thoughts.json",
        parser="OpenAIChat",
        expect={"input_tokens": 7, "output_tokens": 12, "total_tokens": 402},
    ),
    Case(
        "openai_bad_request",
        "/v1/chat/completions",
        JSON,
        file="aigw__chat-bad-request.yaml",
        status=400,
        expect={"error_type": "unsupported_parameter", "input_tokens": None},
    ),
]

BY_NAME = {c.name: c for c in CASES}


# ---- a client hanging up early ----------------------------------------------------------------
@dataclass(frozen=True)
class HangUp:
    """The client hangs up after ``units`` protocol units of ``case`` (negative: all but that
    many; None: all of them, before the upstream's end of stream). ``tokens``: prompt,
    completion, total as the access log shows them and the counters/spans count them."""

    case: str
    point: str
    units: int | None
    outcome: str
    tokens: tuple[int | None, int | None, int | None]

    def cut(self, body: bytes) -> list[bytes]:
        parts = [raw for raw, _ in units(body, BY_NAME[self.case].content_type)]
        return parts if self.units is None else parts[: self.units]


_NONE = (None, None, None)
HANG_UPS = [
    HangUp("openai_chat_stream_usage", "before the first usage", 1, "client_abort", _NONE),
    HangUp("openai_chat_stream_usage", "after finish_reason, before the usage chunk", 2, "client_abort", _NONE),
    HangUp("openai_chat_stream_usage", "after the usage chunk (end marker), before [DONE]", 3, "ok", (12, 100, 112)),
    HangUp("openai_chat_stream_usage", "after [DONE]", None, "ok", (12, 100, 112)),
    HangUp("openai_chat_stream_no_usage", "after the last content chunk (finish_reason)", -1, "client_abort", _NONE),
    HangUp("openai_chat_stream_no_usage", "after [DONE]", None, "ok", _NONE),
    HangUp("openai_completions_stream", "after the last content chunk (finish_reason)", -2, "client_abort", _NONE),
    HangUp("openai_completions_stream", "after the usage chunk (end marker)", -1, "ok", (31, 25, 56)),
    HangUp("openai_responses_stream", "before the first usage", 1, "client_abort", _NONE),
    HangUp("openai_responses_stream", "after the last content chunk", 10, "client_abort", _NONE),
    HangUp("openai_responses_stream", "after response.completed", 11, "ok", (12, 8, 20)),
    HangUp("openai_responses_stream", "after [DONE]", None, "ok", (12, 8, 20)),
    HangUp("anthropic_stream_basic", "before the first usage", 0, "client_abort", _NONE),
    HangUp("anthropic_stream_basic", "after message_start (intermediate usage)", 1, "client_abort", (15, None, 15)),
    HangUp("anthropic_stream_basic", "after the last content chunk", 8, "client_abort", (15, None, 15)),
    HangUp("anthropic_stream_basic", "after message_delta with stop_reason", 10, "ok", (15, 21, 36)),
    HangUp("anthropic_stream_basic", "after message_stop", None, "ok", (15, 21, 36)),
    HangUp("gemini_stream_sse_cumulative", "before the first usage", 0, "client_abort", _NONE),
    HangUp("gemini_stream_sse_cumulative", "after an intermediate usage", 1, "client_abort", (9, None, 9)),
    HangUp("gemini_stream_sse_cumulative", "after a later cumulative usage", 2, "client_abort", (9, 3, 12)),
    HangUp("gemini_stream_sse_cumulative", "after the finishReason chunk (last content, end marker)", None, "ok", (9, 5 + 6, 20)),
    HangUp("gemini_stream_json_array", "after an intermediate usage", 2, "client_abort", (9, 3, 12)),
    HangUp("gemini_stream_json_array", "after the finishReason element", None, "ok", (9, 5 + 6, 20)),
    HangUp("bedrock_converse_stream", "after the last content chunk", 4, "client_abort", _NONE),
    HangUp("bedrock_converse_stream", "after messageStop, before metadata", 6, "client_abort", _NONE),
    HangUp("bedrock_converse_stream", "after metadata (end marker)", None, "ok", (15, 142, 157)),
    HangUp("bedrock_invoke_stream_nova", "after messageStop, before metadata", 8, "client_abort", _NONE),
    HangUp("bedrock_invoke_stream_nova", "after metadata (end marker)", None, "ok", (47, 12, 59)),
    HangUp("bedrock_invoke_stream_claude", "after message_start (intermediate usage)", 1, "client_abort", (35, None, 35)),
    HangUp("bedrock_invoke_stream_claude", "after the last content chunk", 3, "client_abort", (35, None, 35)),
    HangUp("bedrock_invoke_stream_claude", "after message_delta with stop_reason", 5, "ok", (35, 40, 75)),
    HangUp("bedrock_invoke_stream_claude", "after message_stop + invocationMetrics", None, "ok", (35, 40, 75)),
    HangUp("cohere_chat_stream", "after the last content chunk", 3, "client_abort", _NONE),
    HangUp("cohere_chat_stream", "after message-end", None, "ok", (71, 2, 73)),
    HangUp("cohere_v1_chat_stream", "after the last content chunk", 3, "client_abort", _NONE),
    HangUp("cohere_v1_chat_stream", "after stream-end", None, "ok", (69, 9, 78)),
    HangUp("ollama_chat_stream", "after the last content chunk", 2, "client_abort", _NONE),
    HangUp("ollama_chat_stream", "after done: true", None, "ok", (26, 298, 324)),
]
