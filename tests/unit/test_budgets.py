"""budgets: the sidecar's half. With ``budgets.enabled`` each message that carries usage carries
``ratelimit_cost`` (an integer in ``budgets.unit``) for Envoy's rate limit filter to charge; without
it the key never appears. Config errors name the key."""
from __future__ import annotations

import pytest

from extproc.core.call import Call
from extproc.core.config import ConfigError, parse
from extproc.core.observation import Usage
from extproc.core.pricing import Cost, Unpriced
from extproc.server.processor import Processor
from extproc.telemetry.metadata import MAX_RATELIMIT_COST, Budget, fields
from tests.unit.test_cost_outputs import EXPECTED_IN, EXPECTED_OUT
from tests.unit.test_processor import Recorder, body, headers, meta, req_headers, run

SSE = "text/event-stream"


def _budget(**cfg) -> Budget:
    return Budget(parse({"budgets": {"enabled": True, **cfg}}).budgets)


def _call(usage: Usage, cost: Cost | Unpriced | None = None, model: str = "gpt-4o-mini") -> Call:
    call = Call(provider="openai")
    call.obs.usage = usage
    call.obs.request_model = model
    call.cost = cost
    return call


USAGE = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=400)


@pytest.mark.parametrize(("cfg", "expected"), [
    ({}, 1500),
    ({"unit": "total_tokens"}, 1500),
    ({"unit": "input_tokens"}, 1000),
    ({"unit": "output_tokens"}, 500),
    ({"unit": "weighted", "weight": "llm.input_tokens - llm.cached_tokens + 4 * llm.output_tokens"}, 2600),
    ({"unit": "weighted", "weight": "llm.request_model.startsWith('gpt-4o') ? double(llm.total_tokens) * 2.5 : 0.0"}, 3750),
])
def test_token_units(cfg, expected):
    assert _budget(**cfg).cost(_call(USAGE)) == expected


def test_micro_usd_rounds_the_priced_cost_and_charges_unpriced_calls_nothing():
    b = _budget(unit="micro_usd")
    cost = Cost(total=0.000123456, input=0.0001, output=0.000023456, model="m", source="catalogue")
    assert b.cost(_call(USAGE, cost)) == 123
    assert b.cost(_call(USAGE, Unpriced("unknown_model"))) == 0


def test_nothing_before_usage_and_capped_to_what_envoy_accepts():
    b = _budget()
    assert b.cost(_call(Usage())) is None
    assert b.cost(_call(Usage(total_tokens=5 * MAX_RATELIMIT_COST))) == MAX_RATELIMIT_COST
    assert b.cost(_call(Usage(output_tokens=7))) == 7  # input not reported: the total is what was


def test_weighted_expression_that_fails_charges_nothing_and_is_counted():
    b = _budget(unit="weighted", weight="llm.input_tokens / (llm.output_tokens - 500)")
    assert b.cost(_call(USAGE)) is None and b.errors == 1
    neg = _budget(unit="weighted", weight="llm.input_tokens - 10 * llm.output_tokens")
    assert neg.cost(_call(USAGE)) == 0  # never a refund


def test_fields_carry_ratelimit_cost_only_with_a_budget():
    call = _call(USAGE)
    assert "ratelimit_cost" not in fields(call)
    assert fields(call, _budget())["ratelimit_cost"] == 1500


@pytest.mark.parametrize(("cfg", "message"), [
    ({"unit": "weighted"}, "budgets: unit weighted needs weight"),
    ({"weight": "llm.input_tokens"}, "budgets: weight: only used with unit weighted"),
    ({"unit": "weighted", "weight": "jwt.team"}, "budgets: weight: a number computed from llm.* only"),
    ({"unit": "weighted", "weight": "llm.input_tokens +"}, "budgets.weight: invalid CEL expression"),
    ({"unit": "dollars"}, "budgets.unit: Input should be"),
    ({"descriptors": [{"entries": [{"key": "team"}]}]}, "budgets.descriptors.0.entries.0: set exactly one of claim or header"),
    ({"descriptors": [{"entries": [{"key": "t", "header": "x-team", "default": "none"}]}]}, "default: only for a claim"),
    ({"descriptors": []}, "budgets.descriptors: List should have at least 1 item"),
    ({"timeoutMs": 0}, "budgets.timeoutMs: Input should be greater than or equal to 1"),
])
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("*", r"\*").replace("+", r"\+")):
        parse({"budgets": cfg})


def test_micro_usd_needs_pricing():
    with pytest.raises(ConfigError, match="budgets: unit micro_usd needs pricing.enabled"):
        parse({"budgets": {"enabled": True, "unit": "micro_usd"}, "pricing": {"enabled": False}})


def _stream(proc: Processor, events: list[bytes]) -> list:
    return run(proc, [
        req_headers("/v1/messages", x_llm_provider="anthropic"),
        body("request_body", b'{"model":"claude-3-5-haiku-20241022","stream":true,"messages":[]}', end=True),
        headers("response_headers", **{":status": "200", "content-type": SSE}),
        *[body("response_body", e, end=i == len(events) - 1) for i, e in enumerate(events)],
    ])


ANTHROPIC = [
    b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-3-5-haiku-20241022","usage":{"input_tokens":30,"output_tokens":1}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":12}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


def test_streamed_call_carries_its_running_cost_on_each_usage_message():
    """Anthropic reports input tokens first (message_start's output count is a placeholder, not
    counted) and output at the end: ratelimit_cost follows, so a stream cut after message_start
    is charged its input tokens, and a complete one its total."""
    proc = Processor(parse({"budgets": {"enabled": True}}), [Recorder()])
    replies = _stream(proc, ANTHROPIC)
    costs = [meta(r)["ratelimit_cost"] for r in replies if "ratelimit_cost" in meta(r)]
    assert costs[0] == 30 and costs[-1] == 42
    off = Processor(parse({}), [Recorder()])
    assert all("ratelimit_cost" not in meta(r) for r in _stream(off, ANTHROPIC))


def test_micro_usd_in_metadata_matches_the_cost_usd_beside_it():
    proc = Processor(parse({"budgets": {"enabled": True, "unit": "micro_usd"}}), [Recorder()])
    chat = (b'{"id":"c1","model":"gpt-4o-mini-2024-07-18","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],'
            b'"usage":{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":400}}}')
    replies = run(proc, [
        req_headers(),
        body("request_body", b'{"model":"gpt-4o-mini","messages":[]}', end=True),
        headers("response_headers", **{":status": "200", "content-type": "application/json"}),
        body("response_body", chat, end=True),
    ])
    m = meta(replies[-1])
    assert m["ratelimit_cost"] == round((EXPECTED_IN + EXPECTED_OUT) * 1e6) == round(m["cost_usd"] * 1e6)
