"""Every call's price reaches every output once: dynamic metadata (``cost_usd``, on the very
message that carried the usage), ``ai_cost_usd_total``, the span, and an unknown model is
counted as unpriced instead of a silent $0. Expected USD from OpenAI's published rates."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from extproc.core.config import parse
from extproc.core.pricing import Cost, Unpriced
from extproc.server import worker
from extproc.server.processor import Processor
from extproc.telemetry.metrics import MetricsObserver
from extproc.telemetry.tracing import span_attributes
from tests.unit.test_processor import Recorder, body, headers, meta, req_headers, run

# gpt-4o-mini, USD per 1M tokens: input 0.15, cached input 0.075, output 0.60.
USAGE = b'"usage":{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":400}}'
EXPECTED_IN = (600 * 0.15 + 400 * 0.075) / 1e6
EXPECTED_OUT = 500 * 0.60 / 1e6


def _chat(model: str) -> bytes:
    return b'{"id":"c1","model":"' + model.encode() + b'","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],' + USAGE + b"}"


def _drive(model: str, stats_port: int = 0) -> tuple[list, Recorder]:
    rec = Recorder()
    proc = Processor(parse({}), [rec])
    replies = run(
        proc,
        [
            req_headers(),
            body("request_body", b'{"model":"' + model.encode() + b'","messages":[]}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", _chat(model), end=True),
        ],
    )
    return replies, rec


def test_catalogue_model_cost_in_metadata_counter_and_span():
    replies, rec = _drive("gpt-4o-mini-2024-07-18")
    (call,) = rec.calls
    assert isinstance(call.cost, Cost)
    assert abs(call.cost.total - (EXPECTED_IN + EXPECTED_OUT)) < 1e-9
    assert abs(call.cost.input - EXPECTED_IN) < 1e-9 and abs(call.cost.output - EXPECTED_OUT) < 1e-9
    # the message that carried the usage carries the cost (clients may hang up right after)
    assert meta(replies[-1])["cost_usd"] == call.cost.total

    reg = CollectorRegistry()
    MetricsObserver(parse({}).stats, reg).on_call_end(call)
    counted = reg.get_sample_value("ai_cost_usd_total", {"llm": "openai", "model": "gpt-4o-mini-2024-07-18"})
    assert counted == call.cost.total
    assert (
        reg.get_sample_value("ai_cost_unpriced_total", {"llm": "openai", "model": "gpt-4o-mini-2024-07-18", "reason": "unknown_model"})
        is None
    )

    attrs = span_attributes(call, capture=False, max_chars=100)
    assert attrs["gen_ai.usage.cost"] == call.cost.total
    assert (attrs["gen_ai.usage.input_cost"], attrs["gen_ai.usage.output_cost"]) == (call.cost.input, call.cost.output)


def test_unknown_model_is_unpriced_visibly_and_otherwise_recorded():
    replies, rec = _drive("acme-large-9")
    (call,) = rec.calls
    assert call.cost == Unpriced("unknown_model") and call.outcome == "ok"
    assert "cost_usd" not in meta(replies[-1]) and meta(replies[-1])["total_tokens"] == 1500
    reg = CollectorRegistry()
    MetricsObserver(parse({}).stats, reg).on_call_end(call)
    assert reg.get_sample_value("ai_cost_unpriced_total", {"llm": "openai", "model": "acme-large-9", "reason": "unknown_model"}) == 1
    assert reg.get_sample_value("ai_cost_usd_total", {"llm": "openai", "model": "acme-large-9"}) is None
    assert reg.get_sample_value("ai_prompt_tokens_total", {"llm": "openai", "model": "acme-large-9"}) == 1000
    assert "gen_ai.usage.cost" not in span_attributes(call, capture=False, max_chars=100)


def test_override_prices_a_private_model_and_reload_applies_new_prices():
    cfg = {"pricing": {"models": [{"model": "acme-large-9", "inputPerMillion": 2.0, "outputPerMillion": 8.0}]}}
    rec = Recorder()
    proc = Processor(parse(cfg), [rec])
    msgs = [
        req_headers(),
        body("request_body", b'{"model":"acme-large-9","messages":[]}', end=True),
        headers("response_headers", **{":status": "200", "content-type": "application/json"}),
        body("response_body", _chat("acme-large-9"), end=True),
    ]
    run(proc, msgs)
    # cached input defaults to the input rate: 1000 * 2 + 500 * 8
    assert abs(rec.calls[0].cost.total - (1000 * 2.0 + 500 * 8.0) / 1e6) < 1e-12
    cheaper = parse({"pricing": {"models": [{"model": "acme-large-9", "inputPerMillion": 1.0, "outputPerMillion": 1.0}]}})
    assert worker.reconfigure(proc, lambda: cheaper, lambda c: [rec]) is True  # the SIGHUP reload path
    run(proc, msgs)
    assert abs(rec.calls[1].cost.total - 1500 / 1e6) < 1e-12


def test_calls_that_consume_nothing_are_neither_priced_nor_unpriced():
    rec = Recorder()
    proc = Processor(parse({}), [rec])
    run(
        proc,
        [
            req_headers("/v1/messages/count_tokens", **{":authority": "api.anthropic.com"}),
            body("request_body", b'{"model":"claude-3-5-sonnet-20241022","messages":[]}', end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", b'{"input_tokens": 42}', end=True),
        ],
    )
    assert rec.calls[0].cost is None
