"""Bedrock specifics beyond the fixture cases."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.provider_cases import BY_NAME, EVENTSTREAM, Case, invoke_chunk, run


def test_invocation_metrics_used_only_when_the_model_gave_no_usage() -> None:
    """Claude-style stream without usage fields: Bedrock's invocationMetrics fill the gap."""
    body = invoke_chunk({"type": "message_start", "message": {"model": "claude-x", "usage": {}}}) + invoke_chunk(
        {
            "type": "message_stop",
            "amazon-bedrock-invocationMetrics": {"inputTokenCount": 31, "outputTokenCount": 9, "cacheReadInputTokenCount": 2},
        }
    )
    case = Case("x", "/model/anthropic.claude-x/invoke-with-response-stream", EVENTSTREAM, body=body, expect={})
    obs = run(case, [body])
    # inputTokenCount excludes the cache read, like Claude's own input_tokens: normalised input 31 + 2
    assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.usage.cached_input_tokens) == (31 + 2, 9, 2)


def test_anthropic_usage_wins_over_invocation_metrics(load_case: Callable[[Case], bytes]) -> None:
    case = BY_NAME["bedrock_invoke_stream_claude"]
    obs = run(case, [load_case(case)])
    assert (obs.usage.input_tokens, obs.usage.output_tokens) == (25 + 7 + 3, 40)  # not the metrics' 999/998


def test_bad_base64_chunk_is_counted() -> None:
    from tests.support.provider_cases import event_frame

    body = event_frame("chunk", {"bytes": "!!notbase64"})
    case = Case("x", "/model/m/invoke-with-response-stream", EVENTSTREAM, body=body, expect={})
    obs = run(case, [body])
    assert obs.parse_errors == 1


def test_converse_error_body() -> None:
    body = b'{"message":"The provided model identifier is invalid."}'
    case = Case("x", "/model/nope/converse", "application/json", body=body, status=400, expect={})
    obs = run(case, [body])
    assert obs.parse_errors == 0
    assert obs.usage.input_tokens is None


def test_model_id_is_url_decoded_from_path() -> None:
    from tests.support.provider_cases import ROUTER

    m = ROUTER.resolve("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.anthropic.claude-3/converse")
    assert m is not None
    assert m.path_model == "arn:aws:bedrock:us-east-1:1:inference-profile/us.anthropic.claude-3"
    assert m.provider == "bedrock"
