"""finish_reason: each provider's values are normalised to one vocabulary, in the metadata and in
ai_finish_reasons_total."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from extproc.apis.finish import REASONS, normalise
from extproc.core import config
from extproc.core.config import parse
from extproc.server.processor import Processor
from extproc.telemetry.metrics import MetricsObserver
from extproc.telemetry.tracing import span_attributes
from tests.unit.test_processor import Recorder, body, headers, meta, req_headers, run

# (path, request, response, raw finish reason): each one stopped by its token limit
LENGTH_STOPS = {
    "openai": (
        "/v1/chat/completions",
        b'{"model":"gpt-4o","max_tokens":3,"messages":[]}',
        b'{"id":"c","model":"gpt-4o","choices":[{"index":0,"finish_reason":"length","message":{"content":"a b c"}}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}',
        "length",
    ),
    "anthropic": (
        "/v1/messages",
        b'{"model":"claude-x","max_tokens":3,"messages":[]}',
        b'{"id":"m","type":"message","model":"claude-x","stop_reason":"max_tokens","content":[],'
        b'"usage":{"input_tokens":4,"output_tokens":3}}',
        "max_tokens",
    ),
    "gemini": (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        b'{"contents":[],"generationConfig":{"maxOutputTokens":3}}',
        b'{"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"MAX_TOKENS"}],'
        b'"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":3,"totalTokenCount":7},"modelVersion":"gemini-2.5-flash"}',
        "MAX_TOKENS",
    ),
    "bedrock": (
        "/model/anthropic.claude-3-haiku/converse",
        b'{"messages":[],"inferenceConfig":{"maxTokens":3}}',
        b'{"output":{"message":{"role":"assistant","content":[{"text":"a"}]}},"stopReason":"max_tokens",'
        b'"usage":{"inputTokens":4,"outputTokens":3,"totalTokens":7},"metrics":{"latencyMs":5}}',
        "max_tokens",
    ),
    "openai responses": (
        "/v1/responses",
        b'{"model":"gpt-4o","max_output_tokens":3,"input":"hi"}',
        b'{"id":"r","model":"gpt-4o","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},'
        b'"usage":{"input_tokens":4,"output_tokens":3,"total_tokens":7},"output":[]}',
        "max_output_tokens",
    ),
}


def through(path: str, req: bytes, resp: bytes, status: str = "200", content_type: str = "application/json", cfg: dict | None = None):
    rec = Recorder()
    p = Processor(parse(cfg or {}), [rec])
    replies = run(
        p,
        [
            req_headers(path),
            body("request_body", req, end=True),
            headers("response_headers", **{":status": status, "content-type": content_type}),
            body("response_body", resp, end=True),
        ],
    )
    return rec.calls[0], meta(replies[-1])


@pytest.mark.parametrize("api", LENGTH_STOPS)
def test_a_token_limit_stop_is_length_in_metadata_and_counted(api):
    path, req, resp, raw = LENGTH_STOPS[api]
    call, m = through(path, req, resp)
    assert m["finish_reason"] == "length"
    assert span_attributes(call, False, 0)["gen_ai.response.finish_reasons"] == [raw]  # the raw value stays on the span
    registry = CollectorRegistry()
    MetricsObserver(config.StatsConfig(), registry).record(call)
    assert (
        registry.get_sample_value("ai_finish_reasons_total", {"llm": call.provider, "model": m["model"], "finish_reason": "length"}) == 1.0
    )


@pytest.mark.parametrize(
    "raw, want",
    [
        ("stop", "stop"),
        ("end_turn", "stop"),
        ("STOP", "stop"),
        ("stop_sequence", "stop"),
        ("COMPLETE", "stop"),
        ("completed", "stop"),
        ("length", "length"),
        ("max_tokens", "length"),
        ("MAX_TOKENS", "length"),
        ("max_output_tokens", "length"),
        ("tool_calls", "tool_calls"),
        ("tool_use", "tool_calls"),
        ("function_call", "tool_calls"),
        ("TOOL_CALL", "tool_calls"),
        ("content_filter", "content_filter"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("refusal", "content_filter"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("failed", "error"),
        ("ERROR", "error"),
        ("MALFORMED_FUNCTION_CALL", "error"),
        ("pause_turn", "other"),
        ("OTHER", "other"),
        ("something-new", "other"),
    ],
)
def test_normalise(raw, want):
    assert normalise(raw) == want and want in REASONS


def test_an_in_stream_error_event_ends_as_error():
    sse = (
        b'data: {"id":"c","model":"m","choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n'
        b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
    )
    call, m = through("/v1/chat/completions", b'{"model":"m","stream":true}', sse, content_type="text/event-stream")
    assert (m["outcome"], m["finish_reason"]) == ("error", "error")


def test_no_finish_reason_no_key_and_no_count():
    call, m = through("/v1/chat/completions", b'{"model":"m"}', b'{"error":{"type":"rate_limit_exceeded"}}', status="429")
    assert "finish_reason" not in m
    registry = CollectorRegistry()
    MetricsObserver(config.StatsConfig(), registry).record(call)
    assert registry.get_sample_value("ai_finish_reasons_total", {"llm": "openai", "model": "m", "finish_reason": "error"}) is None


def test_finish_reasons_carry_custom_labels():
    stats = config.StatsConfig.model_validate({"customLabels": [{"name": "end_user", "field": "end_user"}]})
    path, req, resp, _ = LENGTH_STOPS["openai"]
    call, _ = through(path, req.replace(b'"messages"', b'"user":"u-9","messages"'), resp)
    registry = CollectorRegistry()
    MetricsObserver(stats, registry).record(call)
    assert (
        registry.get_sample_value(
            "ai_finish_reasons_total", {"llm": "openai", "model": "gpt-4o", "finish_reason": "length", "end_user": "u-9"}
        )
        == 1.0
    )
