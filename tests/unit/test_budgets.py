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


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({}, 1500),
        ({"unit": "total_tokens"}, 1500),
        ({"unit": "input_tokens"}, 1000),
        ({"unit": "output_tokens"}, 500),
        ({"unit": "weighted", "weight": "llm.input_tokens - llm.cached_tokens + 4 * llm.output_tokens"}, 2600),
        ({"unit": "weighted", "weight": "llm.request_model.startsWith('gpt-4o') ? double(llm.total_tokens) * 2.5 : 0.0"}, 3750),
    ],
)
def test_token_units(cfg, expected):
    assert _budget(**cfg).cost(_call(USAGE)) == expected


def test_micro_usd_rounds_the_priced_cost_and_charges_unpriced_calls_their_tokens_at_the_configured_rate():
    b = _budget(unit="micro_usd")
    cost = Cost(total=0.000123456, input=0.0001, output=0.000023456, model="m", source="catalogue")
    assert b.cost(_call(USAGE, cost)) == 123
    assert b.cost(_call(USAGE, Unpriced("unknown_model"))) == 1500 * 75  # $75 per million tokens by default
    assert _budget(unit="micro_usd", unpricedUsdPerMillionTokens=2).cost(_call(USAGE, Unpriced("unknown_model"))) == 3000


def test_a_total_below_input_plus_output_charges_input_plus_output():
    inconsistent = Usage(input_tokens=200_000, output_tokens=10, total_tokens=0)
    assert _budget().cost(_call(inconsistent)) == 200_010
    assert _budget(unit="weighted", weight="llm.total_tokens").cost(_call(inconsistent)) == 200_010
    assert _budget().cost(_call(Usage(input_tokens=5, output_tokens=5, total_tokens=12))) == 12  # a larger total stands


def _served(status: int = 200, priced: bool = True, **params) -> Call:
    call = _call(Usage())
    call.status, call.priced = status, priced
    call.obs.params.update(params)
    return call


@pytest.mark.parametrize(
    ("cfg", "call", "expected"),
    [
        ({}, _served(), 4096),  # no ceiling in the request: the configured charge (default 4,096 tokens)
        ({"unreportedCharge": 700}, _served(), 700),
        ({}, _served(max_tokens=300), 300),  # the request's own ceiling
        ({}, _served(max_completion_tokens=900, max_tokens=300), 900),
        ({"unit": "output_tokens"}, _served(max_output_tokens=50), 50),
        ({"unit": "input_tokens"}, _served(max_tokens=300), 4096),  # an output ceiling says nothing of input
        ({"unit": "micro_usd"}, _served(max_tokens=300), 100_000),  # $0.10
        ({}, _served(status=500), None),  # an error answer serves nothing
        ({}, _served(status=0), None),  # not answered (yet)
        ({}, _served(priced=False), None),  # count_tokens, MCP: no tokens consumed
    ],
)
def test_a_served_call_without_usage_is_never_free(cfg, call, expected):
    assert _budget(**cfg).cost(call) == expected


def test_charges_are_finite_integers_whatever_the_inputs():
    b = _budget(unit="micro_usd")
    for total in (float("inf"), 1e308, 2.0**63):
        assert b.cost(_call(USAGE, Cost(total=total, input=total, output=0.0, model="m", source="override"))) == MAX_RATELIMIT_COST
    huge = Usage(input_tokens=2**53 - 1, output_tokens=2**53 - 1)
    assert _budget(unit="micro_usd", unpricedUsdPerMillionTokens=1e6).cost(_call(huge, Unpriced("unknown_model"))) == MAX_RATELIMIT_COST
    assert _budget(unit="weighted", weight="double(llm.total_tokens) * 1e308 * 1e308").cost(_call(USAGE)) == MAX_RATELIMIT_COST


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


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"unit": "weighted"}, "budgets: unit weighted needs weight"),
        ({"weight": "llm.input_tokens"}, "budgets: weight: only used with unit weighted"),
        ({"unit": "weighted", "weight": "jwt.team"}, "budgets: weight: a number computed from llm.* only"),
        ({"unit": "weighted", "weight": "llm.input_tokens +"}, "budgets.weight: invalid CEL expression"),
        ({"unit": "dollars"}, "budgets.unit: Input should be"),
        ({"descriptors": [{"entries": [{"key": "team"}]}]}, "budgets.descriptors.0.entries.0: set exactly one of claim or header"),
        ({"descriptors": [{"entries": [{"key": "t", "header": "x-team", "default": "none"}]}]}, "default: only for a claim"),
        ({"descriptors": []}, "budgets.descriptors: List should have at least 1 item"),
        ({"timeoutMs": 0}, "budgets.timeoutMs: Input should be greater than or equal to 1"),
        ({"unpricedUsdPerMillionTokens": 1e308}, "budgets.unpricedUsdPerMillionTokens: Input should be less than or equal to 1000000"),
        ({"unpricedUsdPerMillionTokens": float("inf")}, "budgets.unpricedUsdPerMillionTokens: Input should be a finite number"),
        ({"unreportedCharge": -1}, "budgets.unreportedCharge: Input should be greater than or equal to 0"),
        ({"unreportedCharge": 10**10}, "budgets.unreportedCharge: Input should be less than or equal to 1000000000"),
    ],
)
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("*", r"\*").replace("+", r"\+")):
        parse({"budgets": cfg})


def test_micro_usd_needs_pricing():
    with pytest.raises(ConfigError, match="budgets: unit micro_usd needs pricing.enabled"):
        parse({"budgets": {"enabled": True, "unit": "micro_usd"}, "pricing": {"enabled": False}})


def _stream(proc: Processor, events: list[bytes]) -> list:
    return run(
        proc,
        [
            req_headers("/v1/messages", x_llm_provider="anthropic"),
            body("request_body", b'{"model":"claude-3-5-haiku-20241022","stream":true,"messages":[]}', end=True),
            headers("response_headers", **{":status": "200", "content-type": SSE}),
            *[body("response_body", e, end=i == len(events) - 1) for i, e in enumerate(events)],
        ],
    )


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
    # the response's start: no usage yet, the unreported charge; then the usage as it comes
    assert costs[0] == 4096 and costs[1] == 30 and costs[-1] == 42
    off = Processor(parse({}), [Recorder()])
    assert all("ratelimit_cost" not in meta(r) for r in _stream(off, ANTHROPIC))


def test_micro_usd_in_metadata_matches_the_cost_usd_beside_it():
    proc = Processor(parse({"budgets": {"enabled": True, "unit": "micro_usd"}}), [Recorder()])
    chat = (
        b'{"id":"c1","model":"gpt-4o-mini-2024-07-18","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],'
        b'"usage":{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":400}}}'
    )
    replies = run(
        proc,
        [
            req_headers(),
            body("request_body", b'{"model":"gpt-4o-mini","messages":[]}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", chat, end=True),
        ],
    )
    m = meta(replies[-1])
    assert m["ratelimit_cost"] == round((EXPECTED_IN + EXPECTED_OUT) * 1e6) == round(m["cost_usd"] * 1e6)


@pytest.mark.parametrize("budgets", [True, False])
def test_with_budgets_a_client_header_never_names_the_provider(budgets):
    """The price follows the provider: with budgets, a client-sent ``x-llm-provider: ollama`` (a
    provider no catalogue prices) is ignored; the route's grpc_initial_metadata still counts."""
    chat = b'{"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500}}'
    messages = [
        req_headers(x_llm_provider="ollama"),
        body("request_body", b'{"model":"gpt-4o-mini","messages":[]}', end=True),
        headers("response_headers", **{":status": "200", "content-type": "application/json"}),
        body("response_body", chat, end=True),
    ]
    cfg = parse({"budgets": {"enabled": budgets, "unit": "micro_usd"}})
    assert meta(run(Processor(cfg, [Recorder()]), messages)[-1])["provider"] == ("openai" if budgets else "ollama")
    by_route = meta(run(Processor(cfg, [Recorder()]), messages, md=(("x-llm-provider", "azure"),))[-1])
    assert by_route["provider"] == "azure"
