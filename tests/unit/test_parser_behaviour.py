"""Parser behaviour beyond usage numbers: cheap filtering, errors, capture, request facts."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from tests.support.provider_cases import BY_NAME, JSON, NDJSON, SSE, Case, new_parser, run, sse


def test_anthropic_text_deltas_are_not_json_parsed() -> None:
    """Broken JSON in a text delta is never looked at (filtered by event name): no parse error."""
    body = sse(
        ("message_start", {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 3}}}),
        ("content_block_delta", b"{not json"),
        ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 4}}),
    )
    obs = run(Case("x", "/v1/messages", SSE, body=body, expect={}), [body])
    assert obs.parse_errors == 0
    assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.usage.total()) == (3, 4, 7)


def test_anthropic_stream_error_event() -> None:
    body = sse(("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    obs = run(Case("x", "/v1/messages", SSE, body=body, expect={}), [body])
    assert obs.error_type == "overloaded_error"


def test_anthropic_http_error_body() -> None:
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}'
    obs = run(Case("x", "/v1/messages", JSON, body=body, status=429, expect={}), [body])
    assert obs.error_type == "rate_limit_error"


def test_anthropic_capture_and_request(load_case: Callable[[Case], bytes]) -> None:
    case = Case(
        "x",
        "/v1/messages",
        SSE,
        file="agw__anthropic__stream_basic.sse",
        expect={},
        request=b'{"model":"claude-haiku-4-5","stream":true,"max_tokens":99,"messages":[{"role":"user","content":"hi"}]}',
    )
    obs = run(case, [load_case(case)], capture=True)
    assert "".join(obs.output_text or []) == "Hi there! How are you doing today? Is there anything I can help you with?"
    assert obs.request_model == "claude-haiku-4-5"
    assert obs.params == {"max_tokens": 99}
    assert obs.input_messages == [{"role": "user", "content": "hi"}]


def test_negative_token_count_is_refused() -> None:
    body = b'{"type":"message","model":"m","usage":{"input_tokens":-1,"output_tokens":2}}'
    obs = run(Case("x", "/v1/messages", JSON, body=body, expect={}), [body])
    assert obs.usage.input_tokens is None and obs.usage.output_tokens == 2
    assert obs.parse_error_reason == "bad_token_count"


def test_usage_change_is_reported_on_the_chunk_that_carries_it(load_case: Callable[[Case], bytes]) -> None:
    parser, obs = new_parser(BY_NAME["anthropic_stream_basic"])
    body = load_case(BY_NAME["anthropic_stream_basic"])
    first_event_end = body.index(b"\n\n") + 2
    assert parser.feed_response(body[:first_event_end], False) is True
    assert obs.usage.input_tokens == 15
    assert parser.feed_response(body[first_event_end : first_event_end + 10], False) is False


def test_gemini_capture_skips_thoughts(load_case: Callable[[Case], bytes]) -> None:
    case = BY_NAME["vertex_gemini_reasoning"]
    obs = run(case, [load_case(case)], capture=True)
    assert obs.output_text == ["It is sunny."]


def test_gemini_request_params_and_streamed_error() -> None:
    case = Case(
        "x",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        JSON,
        expect={},
        request=b'{"contents":[],"generationConfig":{"temperature":0.2,"maxOutputTokens":50}}',
        body=b'[{"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}]',
    )
    obs = run(case, [case.body or b""])
    assert obs.params == {"temperature": 0.2, "max_tokens": 50}
    assert obs.streaming is True
    assert obs.error_type == "UNAVAILABLE"


def test_gemini_truncated_array_is_counted() -> None:
    body = b'[{"usageMetadata": {"promptTokenCount": 4}}, {"candidates": ['
    obs = run(Case("x", "/v1beta/models/g:streamGenerateContent", JSON, body=body, expect={}), [body])
    assert obs.usage.input_tokens == 4
    assert obs.parse_error_reason == "json_array_truncated"


def test_ollama_streams_unless_told_not_to() -> None:
    parser, obs = new_parser(Case("x", "/api/chat", NDJSON, expect={}, request=b'{"model":"llama3"}'))
    assert obs.streaming is True
    parser, obs = new_parser(Case("x", "/api/chat", JSON, expect={}, request=b'{"model":"llama3","stream":false}'))
    assert obs.streaming is False


def test_ollama_token_lines_are_not_parsed() -> None:
    body = (
        b'{"model":"llama3","message":{"content":"a"},"done":false}\n'
        b"{broken token line, never parsed\n"
        b'{"model":"llama3","done":true,"prompt_eval_count":5,"eval_count":6}\n'
    )
    obs = run(Case("x", "/api/generate", NDJSON, body=body, expect={}), [body])
    assert obs.parse_errors == 0
    assert (obs.usage.input_tokens, obs.usage.output_tokens) == (5, 6)


def test_ollama_capture(load_case: Callable[[Case], bytes]) -> None:
    case = BY_NAME["ollama_chat_stream"]
    obs = run(case, [load_case(case)], capture=True)
    assert "".join(obs.output_text or []) == "The sky"


def test_cohere_stream_capture(load_case: Callable[[Case], bytes]) -> None:
    case = BY_NAME["cohere_chat_stream"]
    obs = run(case, [load_case(case)], capture=True)
    assert obs.output_text == ["Hi"]
    assert obs.response_id == "c-1"


def test_count_tokens_is_not_usage() -> None:
    obs = run(BY_NAME["anthropic_count_tokens"], [b'{"input_tokens": 12}'])
    assert obs.usage.seen() is False
    assert obs.extra["counted_input_tokens"] == 12


def test_gemini_http_error_in_array() -> None:
    body = b'[{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}]'
    obs = run(Case("x", "/v1beta/models/g:streamGenerateContent", JSON, body=body, status=429, expect={}), [body])
    assert obs.error_type == "RESOURCE_EXHAUSTED"
    assert obs.parse_errors == 0


# Each API's prompt field, as its request schema names it (documented request shapes).
_PROMPTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, [{"role": "user", "content": "hi"}]),
    ("/v1/completions", {"prompt": "once upon"}, "once upon"),
    ("/v1/embeddings", {"input": ["a", "b"]}, ["a", "b"]),
    ("/v1/responses", {"input": "tell me"}, "tell me"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "yo"}]}, [{"role": "user", "content": "yo"}]),
    ("/v2/chat", {"messages": [{"role": "user", "content": "c"}]}, [{"role": "user", "content": "c"}]),
    ("/v1/chat", {"message": "v1"}, "v1"),
    ("/v2/embed", {"texts": ["t1"]}, ["t1"]),
    ("/v2/embed", {"inputs": [{"content": []}]}, [{"content": []}]),
    (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"contents": [{"parts": [{"text": "g"}]}]},
        [{"role": "user", "content": [{"text": "g"}]}],
    ),
    (
        "/model/amazon.nova-lite-v1:0/converse",
        {"messages": [{"role": "user", "content": [{"text": "b"}]}]},
        [{"role": "user", "content": [{"text": "b"}]}],
    ),
    ("/api/chat", {"messages": [{"role": "user", "content": "o"}]}, [{"role": "user", "content": "o"}]),
    ("/api/generate", {"prompt": "p"}, "p"),
    ("/api/embed", {"input": "e"}, "e"),
]


@pytest.mark.parametrize(("path", "request_body", "want"), _PROMPTS, ids=[f"{p}:{next(iter(b))}" for p, b, _ in _PROMPTS])
def test_prompt_captured_only_when_asked(path: str, request_body: dict, want: object) -> None:
    case = Case("x", path, JSON, body=b"{}", expect={}, request=orjson.dumps({"model": "m", **request_body}))
    assert new_parser(case, capture=True)[1].input_messages == want
    assert new_parser(case, capture=False)[1].input_messages is None


def test_cohere_v1_stream_capture_takes_text_once() -> None:
    """The stream's text comes from its deltas; the stream-end copy of the whole text is not added again."""
    case = BY_NAME["cohere_v1_chat_stream"]
    obs = run(case, [case.body or b""], capture=True)
    assert "".join(obs.output_text or []) == "Hello there, stream-end"
    assert obs.response_id == "r-1"
    whole = BY_NAME["cohere_v1_chat_json"]
    assert run(whole, [whole.body or b""], capture=True).output_text == ["Hi"]


@pytest.mark.parametrize(
    "path,body",
    [
        (
            "/v1/chat/completions",
            {
                "id": "c",
                "model": "gpt-4o-mini",
                "service_tier": "flex",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            },
        ),
        (
            "/v1/responses",
            {
                "id": "r",
                "model": "o4-mini",
                "status": "completed",
                "service_tier": "flex",
                "usage": {"input_tokens": 3, "output_tokens": 4},
            },
        ),
    ],
)
def test_openai_service_tier_is_recorded(path: str, body: dict) -> None:
    """The tier the response reports picks the price (extproc.core.pricing)."""
    raw = orjson.dumps(body)
    obs = run(Case("x", path, JSON, body=raw, expect={}), [raw])
    assert obs.extra["service_tier"] == "flex"


def test_openai_streamed_service_tier_is_recorded() -> None:
    body = sse(
        (None, {"id": "c", "model": "gpt-4o-mini", "service_tier": "priority", "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
        (
            None,
            {
                "id": "c",
                "model": "gpt-4o-mini",
                "service_tier": "priority",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            },
        ),
    )
    obs = run(Case("x", "/v1/chat/completions", SSE, body=body, expect={}), [body])
    assert obs.extra["service_tier"] == "priority" and obs.usage.output_tokens == 4


@pytest.mark.parametrize(
    "body,want",
    [
        # OpenAI: the code names the class, the type is broader
        (b'{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}', "rate_limit_exceeded"),
        (b'{"error":{"message":"bad","type":"invalid_request_error","param":"model","code":null}}', "invalid_request_error"),
        (b'{"error":{"message":"bad key","type":"invalid_request_error","code":"invalid_api_key"}}', "invalid_api_key"),
        # a numeric code is the HTTP status again, not a class (Mistral, some OpenAI-compatible servers)
        (b'{"object":"error","message":"x","error":{"type":"invalid_request_error","code":"3051"}}', "invalid_request_error"),
        (b'{"error":{"code":429,"message":"x","status":"RESOURCE_EXHAUSTED"}}', "RESOURCE_EXHAUSTED"),
    ],
)
def test_error_type_prefers_a_naming_code_then_type_then_status(body: bytes, want: str) -> None:
    obs = run(Case("x", "/v1/chat/completions", JSON, body=body, status=429, expect={}), [body])
    assert obs.error_type == want


def test_openai_429_error_type_reaches_the_metrics_label() -> None:
    from prometheus_client import CollectorRegistry

    from extproc.core.config import StatsConfig, parse
    from extproc.server.processor import Processor
    from extproc.telemetry.metrics import MetricsObserver
    from tests.unit.test_processor import Recorder, body, headers, req_headers
    from tests.unit.test_processor import run as drive

    reg = CollectorRegistry()
    rec = Recorder()
    metrics = MetricsObserver(StatsConfig(), reg)
    err = b'{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}'
    drive(
        Processor(parse({}), [rec, metrics]),
        [
            req_headers(),
            body("request_body", b'{"model":"gpt-4o"}', end=True),
            headers("response_headers", **{":status": "429", "content-type": "application/json"}),
            body("response_body", err, end=True),
        ],
    )
    assert rec.calls[0].outcome == "error"
    assert (
        reg.get_sample_value(
            "ai_requests_total",
            {
                "llm": "openai",
                "model": "gpt-4o",
                "operation": "chat",
                "status_code": "429",
                "outcome": "error",
                "error_type": "rate_limit_exceeded",
            },
        )
        == 1
    )


# A system prompt given beside the messages leads them as a system message, as in OpenAI's chat API.
_SYSTEMS = [
    (
        "/v1/messages",
        {"system": "be brief", "messages": [{"role": "user", "content": "yo"}]},
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}],
    ),
    (
        "/v1/messages",
        {"system": [{"type": "text", "text": "be brief"}], "messages": [{"role": "user", "content": "yo"}]},
        [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, {"role": "user", "content": "yo"}],
    ),
    (
        "/model/amazon.nova-lite-v1:0/converse",
        {"system": [{"text": "be brief"}], "messages": [{"role": "user", "content": [{"text": "b"}]}]},
        [{"role": "system", "content": [{"text": "be brief"}]}, {"role": "user", "content": [{"text": "b"}]}],
    ),
    (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"systemInstruction": {"parts": [{"text": "be brief"}]}, "contents": [{"role": "user", "parts": [{"text": "g"}]}]},
        [{"role": "system", "content": [{"text": "be brief"}]}, {"role": "user", "content": [{"text": "g"}]}],
    ),
    ("/v1/responses", {"instructions": "be brief", "input": "tell me"}, [{"role": "system", "content": "be brief"}, "tell me"]),
    ("/api/generate", {"system": "be brief", "prompt": "p"}, [{"role": "system", "content": "be brief"}, "p"]),
]


@pytest.mark.parametrize(("path", "request_body", "want"), _SYSTEMS, ids=[f"{p}:{i}" for i, (p, _, _) in enumerate(_SYSTEMS)])
def test_system_prompt_leads_the_captured_messages(path: str, request_body: dict, want: list) -> None:
    case = Case("x", path, JSON, body=b"{}", expect={}, request=orjson.dumps({"model": "m", **request_body}))
    obs = new_parser(case, capture=True)[1]
    assert obs.input_messages == want
    assert obs.system_apart  # given beside the messages: GenAI's gen_ai.system_instructions
    assert obs.message_count == len(want)  # the summary counts it like OpenAI's system message
    off = new_parser(case, capture=False)[1]
    assert off.input_messages is None and off.message_count == len(want)


def test_a_system_message_inside_the_messages_is_not_apart() -> None:
    """OpenAI chat's system message is part of the chat history (gen_ai.input.messages)."""
    request = {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]}
    case = Case("x", "/v1/chat/completions", JSON, body=b"{}", expect={}, request=orjson.dumps(request))
    obs = new_parser(case, capture=True)[1]
    assert obs.input_messages == request["messages"] and not obs.system_apart


_CHAT_PIECES = [
    b'{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}',
    b',"finish_reason":null}]}',
    b',"finish_reason":"stop"}]}',
    b',"finish_reason": "length"}]}',
    b'"usage":null',
    b'"usage":{"prompt_tokens":3}',
    b'"usage": null',
    b'{"error"',
    b'"finish_reason"',
    b"x",
    b'"',
]


def _old_chat_filter(capture: bool, model: str | None, data: bytes) -> bool:
    """The chat filter as three substring searches (its definition)."""
    return (
        capture
        or model is None
        or (b'"usage"' in data and b'"usage":null' not in data)
        or b'"finish_reason":"' in data
        or b'"finish_reason": "' in data
        or data.startswith(b'{"error"')
    )


def test_the_chat_filter_wants_exactly_the_chunks_its_substring_searches_want() -> None:
    """OpenAI chat's ``want_sse_event`` (one scan for usage or a finish reason, then the
    searches only where it matched) wants the same events as its three substring searches."""
    import itertools

    from extproc.apis.openai import OpenAIChat
    from extproc.core.observation import Observation

    datas = [b"".join(p) for n in range(4) for p in itertools.product(_CHAT_PIECES, repeat=n)]
    for capture, model in ((False, "gpt-4o"), (False, None), (True, "gpt-4o")):
        obs = Observation()
        parser = OpenAIChat(obs, capture=capture)
        obs.response_model = model
        for data in datas:
            assert parser.want_sse_event(b"", data) == _old_chat_filter(capture, model, data), data


def test_the_chat_filters_scan_alone_rejects_a_text_delta_with_usage_null() -> None:
    """With ``stream_options.include_usage`` every text delta carries ``"usage":null``: the
    filter's one scan rejects it, with no substring search after it."""
    from extproc.apis.openai import _USAGE_OR_FINISH

    delta = b'{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}'
    assert _USAGE_OR_FINISH(delta) is None
    assert _USAGE_OR_FINISH(delta.replace(b'"usage":null', b'"usage":{"prompt_tokens":3}')) is not None


_ANTHROPIC_PIECES = [
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}',
    b'{"type":"message_start"',
    b'{"type":"message_delta"',
    b'{"type":"message_stop"}',
    b'{"type":"error"',
    b'"usage"',
    b'"message_sta',
    b'rt"',
    b"x" * 40,
]


def _old_anthropic_filter(capture: bool, data: bytes) -> bool:
    """Anthropic's event filter as substring searches (its definition): an event type that can
    carry usage, the model or a finish/error within the first 64 bytes, or usage anywhere."""
    head = data[:64]
    types = (b'"message_start"', b'"message_delta"', b'"message_stop"', b'"error"')
    return capture or any(t in head for t in types) or b'"usage"' in data


def test_the_anthropic_filter_wants_exactly_the_events_its_substring_searches_want() -> None:
    """Anthropic's ``want_anthropic_event`` (one regex scan of the first 64 bytes for the useful
    types, then a search for usage) wants the same events as its substring searches, a type cut
    by the 64-byte boundary included."""
    import itertools

    from extproc.apis.anthropic import AnthropicMessages
    from extproc.core.observation import Observation

    datas = [b"".join(p) for n in range(4) for p in itertools.product(_ANTHROPIC_PIECES, repeat=n)]
    datas += [b"y" * k + b'"message_stop"' for k in range(40, 60)]  # across the 64th byte
    for capture in (False, True):
        parser = AnthropicMessages(Observation(), capture=capture)
        for data in datas:
            assert parser.want_anthropic_event(data) == _old_anthropic_filter(capture, data), data
