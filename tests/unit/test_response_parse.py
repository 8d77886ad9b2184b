"""A non-streamed response's parse and price, on the short paths the servicer takes for most
calls: the body whole in one message, token counts that are plain integers, the ``Cost`` set
through its slots. Each must give what the general path gives."""

from __future__ import annotations

import dataclasses
import json

import orjson
import pytest

from extproc.apis.base import MAX_TOKENS, Limits, as_int
from extproc.apis.openai import OpenAIChat
from extproc.core.observation import Observation
from extproc.core.pricing import Cost, _rounded

BODY = orjson.dumps(
    {
        "id": "c1",
        "model": "gpt-4o-2024",
        "service_tier": "default",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": "hi"}}],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 7,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 3},
        },
    }
)


def _parsed(chunks: list[bytes], limits: Limits = Limits()) -> tuple[OpenAIChat, Observation, list[bool]]:
    obs = Observation()
    parser = OpenAIChat(obs, limits=limits)
    parser.start_response(200, "application/json")
    changed = [parser.feed_response(chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks)]
    return parser, obs, changed


def test_a_body_whole_in_one_message_parses_as_one_in_several() -> None:
    one, obs_one, changed_one = _parsed([BODY])
    for chunks in ([BODY[:10], BODY[10:]], [b"", BODY], [BODY[:1], BODY[1:-1], BODY[-1:]], [BODY, b""]):
        several, obs, changed = _parsed(chunks)
        assert obs == obs_one
        assert changed[-1] is changed_one[-1] is True
        assert several.complete and one.complete
        assert several.held_bytes() == one.held_bytes() == 0
    assert obs_one.usage.input_tokens == 5 and obs_one.usage.cached_input_tokens == 2 and obs_one.usage.reasoning_tokens == 3
    assert obs_one.finish_reasons == ["stop"] and obs_one.response_model == "gpt-4o-2024" and obs_one.parse_errors == 0


@pytest.mark.parametrize("chunks", [[BODY], [BODY[:10], BODY[10:]]])
def test_a_body_over_the_cap_is_counted_and_not_parsed_in_one_message_or_several(chunks: list[bytes]) -> None:
    parser, obs, _ = _parsed(chunks, Limits(max_body_bytes=len(BODY) - 1))
    assert obs.parse_error_reason == "body_too_large" and obs.parse_errors == 1
    assert obs.usage.input_tokens is None and obs.response_model is None
    assert parser.held_bytes() == 0


@pytest.mark.parametrize("value", [0, 1, MAX_TOKENS, MAX_TOKENS + 1, -1, True, False, 3.0, 2.5, -1.0, 1e300, "5", None, [1], 10**30])
def test_each_token_count_is_taken_or_refused_as_as_int_decides(value: object) -> None:
    usage = {
        "prompt_tokens": value,
        "completion_tokens": value,
        "total_tokens": value,
        "prompt_tokens_details": {"cached_tokens": value},
        "completion_tokens_details": {"reasoning_tokens": value},
    }
    obs = Observation()
    parser = OpenAIChat(obs)
    parser.start_response(200, "application/json")
    parser.feed_response(json.dumps({"model": "m", "usage": usage}).encode(), True)  # (json: ints past 64 bits)
    want = as_int(value)
    u = obs.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens, u.cached_input_tokens, u.reasoning_tokens) == (want,) * 5
    refused = value is not None and want is None
    assert obs.parse_errors == (5 if refused else 0)
    assert obs.parse_error_reason == ("bad_token_count" if refused else None)


def test_a_priced_cost_is_the_frozen_dataclass_its_constructor_builds() -> None:
    got = _rounded(7.499999999999999e-06, 1.0000000000004e-06, 6.5e-06, "gpt-4o", "catalogue")
    want = Cost(round(7.499999999999999e-06, 12), round(1.0000000000004e-06, 12), 6.5e-06, "gpt-4o", "catalogue")
    assert got == want and hash(got) == hash(want) and repr(got) == repr(want)
    assert dataclasses.astuple(got) == (7.5e-06, 1e-06, 6.5e-06, "gpt-4o", "catalogue")
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.total = 1.0  # type: ignore[misc]
