"""Cost in USD per call (extproc.core.pricing), from usage in its normalised meaning (input
includes cache reads and writes, output includes reasoning: the parsers derive it; see
tests/unit/test_token_semantics.py for every API's reported fields).

Expected amounts are computed here from the providers' published per-million rates, written as
literals: a catalogue (genai-prices) bump that changes a price or a token meaning fails these.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from extproc.apis.routing import catalogue_ids
from extproc.core.config import ConfigError, parse
from extproc.core.observation import Usage
from extproc.core.pricing import Cost, Pricer, PricingConfig, Unpriced, _library_cost, _plan

M = 1_000_000


def usd(**parts: float) -> float:
    return sum(parts.values())


@pytest.fixture(scope="module")
def pricer() -> Pricer:
    return Pricer(catalogue=catalogue_ids())


def cost(result: Cost | Unpriced) -> Cost:
    assert isinstance(result, Cost), result
    return result


# ---- catalogue models -------------------------------------------------------------------------
def test_openai_gpt_4o_mini_cached_and_reasoning(pricer: Pricer) -> None:
    # gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M tokens.
    # OpenAI's prompt_tokens INCLUDE the cached ones; completion_tokens INCLUDE reasoning.
    u = Usage(input_tokens=12_000, output_tokens=900, total_tokens=12_900, cached_input_tokens=8_064, reasoning_tokens=256)
    c = cost(pricer.price("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", u))
    want_in = (12_000 - 8_064) * 0.15 / M + 8_064 * 0.075 / M
    want_out = 900 * 0.60 / M
    assert c.input == pytest.approx(want_in, abs=1e-9)
    assert c.output == pytest.approx(want_out, abs=1e-9)
    assert c.total == pytest.approx(want_in + want_out, abs=1e-9)
    assert (c.model, c.source) == ("gpt-4o-mini", "catalogue")


def test_openai_service_tier_selects_the_rate(pricer: Pricer) -> None:
    # gpt-4o-mini priority processing: $0.25 input, $0.125 cached, $1.00 output; flex has no
    # gpt-4o-mini rate (standard applies).
    u = Usage(input_tokens=1_000, output_tokens=200, cached_input_tokens=400)
    priority = cost(pricer.price("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", u, service_tier="priority"))
    assert priority.total == pytest.approx((600 * 0.25 + 400 * 0.125 + 200 * 1.00) / M, abs=1e-9)
    default = cost(pricer.price("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", u, service_tier="default"))
    assert default.total == pytest.approx((600 * 0.15 + 400 * 0.075 + 200 * 0.60) / M, abs=1e-9)


def test_openai_responses_api_same_meaning(pricer: Pricer) -> None:
    # o4-mini: $1.10 input, $0.275 cached, $4.40 output; reasoning is billed as output.
    u = Usage(input_tokens=5_000, output_tokens=3_000, cached_input_tokens=1_000, reasoning_tokens=2_500)
    c = cost(pricer.price("openai", "o4-mini", "o4-mini-2025-04-16", u))
    assert c.total == pytest.approx((4_000 * 1.10 + 1_000 * 0.275 + 3_000 * 4.40) / M, abs=1e-9)


def test_anthropic_cache_reads_and_writes(pricer: Pricer) -> None:
    # Claude Sonnet 4: $3 input, $0.30 cache read, $3.75 cache write (5 min), $15 output.
    # Anthropic reports input_tokens 1,500 EXCLUDING the cache: normalised input 25,500.
    u = Usage(input_tokens=25_500, output_tokens=700, cached_input_tokens=20_000, cache_creation_input_tokens=4_000)
    c = cost(pricer.price("anthropic", "claude-sonnet-4-20250514", "claude-sonnet-4-20250514", u))
    want_in = 1_500 * 3 / M + 20_000 * 0.30 / M + 4_000 * 3.75 / M
    assert c.input == pytest.approx(want_in, abs=1e-9)
    assert c.output == pytest.approx(700 * 15 / M, abs=1e-9)
    assert c.total == pytest.approx(want_in + 700 * 15 / M, abs=1e-9)


def test_claude_on_vertex_falls_back_to_the_anthropic_catalogue(pricer: Pricer) -> None:
    u = Usage(input_tokens=1_300, output_tokens=50, cached_input_tokens=1_000, cache_creation_input_tokens=200)
    want = (100 * 3 + 1_000 * 0.30 + 200 * 3.75 + 50 * 15) / M  # Claude 3.5 Sonnet v2
    c = cost(pricer.price("vertex_ai", "claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet-v2-20241022", u))
    assert c.total == pytest.approx(want, abs=1e-9)
    # Priced by the request model when the response names none.
    assert cost(pricer.price("vertex_ai", "claude-3-5-sonnet-v2@20241022", None, u)).total == pytest.approx(want, abs=1e-9)


def test_gemini_thoughts_are_output(pricer: Pricer) -> None:
    # Gemini 2.5 Flash: $0.30 input, $0.03 cached, $2.50 output (thinking included).
    # promptTokenCount INCLUDES cachedContentTokenCount; candidatesTokenCount 400 EXCLUDES the
    # 1,200 thoughts: normalised output 1,600.
    u = Usage(input_tokens=10_000, output_tokens=1_600, total_tokens=11_600, cached_input_tokens=6_000, reasoning_tokens=1_200)
    c = cost(pricer.price("gemini", "gemini-2.5-flash", "gemini-2.5-flash", u))
    want_in = 4_000 * 0.30 / M + 6_000 * 0.03 / M
    want_out = (400 + 1_200) * 2.50 / M
    assert c.input == pytest.approx(want_in, abs=1e-9)
    assert c.output == pytest.approx(want_out, abs=1e-9)
    # Same model on Vertex AI.
    assert cost(pricer.price("vertex_ai", "gemini-2.5-flash", "gemini-2.5-flash", u)).total == pytest.approx(want_in + want_out, abs=1e-9)


def test_gemini_long_context_tier(pricer: Pricer) -> None:
    # Gemini 2.5 Pro: prompts up to 200k tokens $1.25 in / $0.125 cached / $10 out; longer
    # prompts $2.50 / $0.25 / $15 for the WHOLE call.
    short = Usage(input_tokens=200_000, output_tokens=1_000, cached_input_tokens=0)
    long = Usage(input_tokens=200_001, output_tokens=1_000, cached_input_tokens=100_000)
    assert cost(pricer.price("gemini", "gemini-2.5-pro", None, short)).total == pytest.approx((200_000 * 1.25 + 1_000 * 10) / M, abs=1e-9)
    assert cost(pricer.price("gemini", "gemini-2.5-pro", None, long)).total == pytest.approx(
        (100_001 * 2.50 + 100_000 * 0.25 + 1_000 * 15) / M, abs=1e-9
    )


@pytest.mark.parametrize(
    "model_id",
    [
        "anthropic.claude-3-5-sonnet-20240620-v1:0",
        "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20240620-v1:0",
    ],
)
def test_bedrock_model_ids(pricer: Pricer, model_id: str) -> None:
    # Claude 3.5 Sonnet on Bedrock: $3 input, $0.30 cache read, $3.75 cache write, $15 output.
    # Converse's inputTokens (and Claude's invoke input_tokens) 2,000 EXCLUDE cache reads and
    # writes: normalised input 5,000.
    u = Usage(input_tokens=5_000, output_tokens=300, total_tokens=5_300, cached_input_tokens=2_500, cache_creation_input_tokens=500)
    c = cost(pricer.price("bedrock", model_id, None, u))
    assert c.total == pytest.approx((2_000 * 3 + 2_500 * 0.30 + 500 * 3.75 + 300 * 15) / M, abs=1e-9)


def test_bedrock_nova(pricer: Pricer) -> None:
    # Amazon Nova Pro: $0.80 input, $0.20 cache read, $3.20 output.
    u = Usage(input_tokens=4_000, output_tokens=100, cached_input_tokens=3_000)  # inputTokens 1,000 + 3,000 read
    c = cost(pricer.price("bedrock", "amazon.nova-pro-v1:0", None, u))
    assert c.total == pytest.approx((1_000 * 0.80 + 3_000 * 0.20 + 100 * 3.20) / M, abs=1e-9)


def test_azure_deployment_name_falls_back_to_the_response_model(pricer: Pricer) -> None:
    u = Usage(input_tokens=1_000, output_tokens=100)
    c = cost(pricer.price("azure", "my-prod-deployment", "gpt-4o-mini-2024-07-18", u))
    assert c.total == pytest.approx((1_000 * 0.15 + 100 * 0.60) / M, abs=1e-9)
    # The response model is unknown to the catalogue: the request model is tried next.
    c = cost(pricer.price("openai", "gpt-4o-mini", "gpt-4o-mini-experimental-xyz", u))
    assert c.total == pytest.approx((1_000 * 0.15 + 100 * 0.60) / M, abs=1e-9)


# ---- overrides --------------------------------------------------------------------------------
def overrides(*models: dict) -> Pricer:
    return Pricer(parse({"pricing": {"models": list(models)}}).pricing, catalogue_ids())


def test_override_model() -> None:
    p = overrides(
        {
            "model": "acme-large",
            "provider": "acme",
            "inputPerMillion": 2.0,
            "outputPerMillion": 8.0,
            "cachedInputPerMillion": 0.5,
            "cacheWritePerMillion": 2.5,
        }
    )
    u = Usage(input_tokens=10_000, output_tokens=2_000, cached_input_tokens=3_000, cache_creation_input_tokens=1_000)
    c = cost(p.price("acme", "acme-large", None, u))  # input includes the cache
    want_in = (6_000 * 2.0 + 3_000 * 0.5 + 1_000 * 2.5) / M
    assert (c.input, c.output, c.source, c.model) == (
        pytest.approx(want_in, abs=1e-9),
        pytest.approx(2_000 * 8.0 / M, abs=1e-9),
        "override",
        "acme-large",
    )
    assert c.total == pytest.approx(want_in + 16_000 / M, abs=1e-9)
    # provider given: another provider serving a model of that name is not matched
    assert p.price("other", "acme-large", None, u) == Unpriced("unknown_model")


def test_override_defaults_and_order_and_regex() -> None:
    p = overrides(
        {"modelRegex": "^ft:gpt-4o-mini", "inputPerMillion": 0.30, "outputPerMillion": 1.20},
        {"model": "gpt-4o-mini", "inputPerMillion": 0.10, "outputPerMillion": 0.40},  # negotiated discount
        {"modelRegex": "^llama", "provider": "ollama", "inputPerMillion": 0, "outputPerMillion": 0},
    )
    u = Usage(input_tokens=1_000, output_tokens=100, cached_input_tokens=500)
    # cachedInputPerMillion defaults to the input rate
    assert cost(p.price("openai", "ft:gpt-4o-mini:acme::abc", None, u)).total == pytest.approx((1_000 * 0.30 + 100 * 1.20) / M, abs=1e-9)
    # matched on the request model although the response model differs; beats the catalogue
    assert cost(p.price("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", u)).total == pytest.approx(
        (1_000 * 0.10 + 100 * 0.40) / M, abs=1e-9
    )
    free = cost(p.price("ollama", "llama3.2:3b", "llama3.2:3b", Usage(input_tokens=50, output_tokens=60)))
    assert free.total == 0.0 and free.source == "override"


def test_override_prices_anthropic_cache_at_its_rates() -> None:
    p = overrides(
        {"model": "claude-private", "inputPerMillion": 1, "outputPerMillion": 5, "cachedInputPerMillion": 0.1, "cacheWritePerMillion": 1.25}
    )
    u = Usage(input_tokens=1_500, output_tokens=10, cached_input_tokens=1_000, cache_creation_input_tokens=400)
    c = cost(p.price("anthropic", "claude-private", None, u))
    assert c.total == pytest.approx((100 * 1 + 1_000 * 0.1 + 400 * 1.25 + 10 * 5) / M, abs=1e-9)


# ---- unpriced ---------------------------------------------------------------------------------
def test_unknown_model_and_provider(pricer: Pricer) -> None:
    u = Usage(input_tokens=10, output_tokens=10)
    assert pricer.price("openai", "no-such-model-9000", None, u) == Unpriced("unknown_model")
    assert pricer.price("ollama", "llama3.2", "llama3.2", u) == Unpriced("unknown_model")
    # a self-hosted server named like a public model is not priced at the public rate
    assert pricer.price("unknown", "gpt-4o-mini", None, u) == Unpriced("unknown_model")
    assert pricer.price("openai", None, None, u) == Unpriced("unknown_model")


def test_no_usage_error_disabled(pricer: Pricer) -> None:
    assert pricer.price("openai", "gpt-4o-mini", None, Usage()) == Unpriced("no_usage")
    assert pricer.price("openai", "gpt-4o-mini", None, Usage(total_tokens=5)) == Unpriced("no_usage")
    # cached > prompt: inconsistent usage is an error, not an exception
    assert pricer.price("openai", "gpt-4o-mini", None, Usage(input_tokens=10, output_tokens=1, cached_input_tokens=100)) == Unpriced(
        "error"
    )
    assert Pricer(PricingConfig(enabled=False)).price("openai", "gpt-4o-mini", None, Usage(1, 1)) == Unpriced("disabled")


def test_never_raises(pricer: Pricer) -> None:
    class Broken:
        def __getattr__(self, name: str) -> object:
            raise RuntimeError("boom")

    assert pricer.price("openai", "gpt-4o-mini", None, Broken()) == Unpriced("error")  # type: ignore[arg-type]
    # a model that needs the library's own algebra with nonsense counts
    assert isinstance(
        pricer.price("openai", "gpt-4o-mini", None, Usage(input_tokens=1, output_tokens=5, reasoning_tokens=99)), (Cost, Unpriced)
    )


def test_fast_path_agrees_with_the_library_on_every_catalogue_model() -> None:
    """The in-house arithmetic for plain token rates equals genai-prices' own calculation."""
    from genai_prices import data_snapshot

    rng = random.Random(13)
    checked = fast = 0
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            for tier in (None, "priority", "flex"):
                try:
                    plan = _plan(provider, model, tier)
                except Exception:
                    continue
                checked += 1
                if plan is None:
                    continue
                fast += 1
                for _ in range(3):
                    inp = rng.choice((0, 1, 999, 150_000, 250_000, 1_500_000))
                    read = rng.randint(0, inp // 2)
                    write = rng.randint(0, (inp - read) // 2)
                    t = Usage(
                        input_tokens=inp, output_tokens=rng.randint(0, 50_000), cached_input_tokens=read, cache_creation_input_tokens=write
                    )
                    mine = plan.cost(t, model.id)
                    theirs = _library_cost(provider, model, t, tier)
                    assert isinstance(mine, Cost) and isinstance(theirs, Cost), (provider.id, model.id)
                    for a, b in ((mine.total, theirs.total), (mine.input, theirs.input), (mine.output, theirs.output)):
                        assert a == pytest.approx(b, rel=1e-12, abs=1e-12), (provider.id, model.id, tier, t)
    assert checked > 500 and fast / checked > 0.8, (checked, fast)


def test_the_pricer_reads_the_normalised_usage_as_it_is() -> None:
    """Input includes the cache reads and writes (each at its own rate); output includes reasoning."""
    rates = {"model": "m", "inputPerMillion": 1.0, "outputPerMillion": 10.0, "cachedInputPerMillion": 0.1, "cacheWritePerMillion": 2.0}
    pricer = Pricer(PricingConfig.model_validate({"models": [rates]}))
    u = Usage(input_tokens=100, output_tokens=10, cached_input_tokens=30, cache_creation_input_tokens=5, reasoning_tokens=4)
    cost = pricer.price("openai", "m", None, u)
    assert isinstance(cost, Cost)
    assert cost.input == pytest.approx((65 * 1.0 + 30 * 0.1 + 5 * 2.0) / 1e6, abs=1e-15)
    assert cost.output == pytest.approx(10 * 10.0 / 1e6, abs=1e-15)
    assert pricer.price("openai", "m", None, Usage(total_tokens=3)) == Unpriced("no_usage")


def test_lookups_are_cached() -> None:
    pricer = Pricer(catalogue=catalogue_ids())
    u = Usage(input_tokens=10, output_tokens=10)
    pricer.price("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", u)
    n = len(pricer._lookup)
    for _ in range(5):
        pricer.price("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", u)
        pricer.price("openai", "no-such-model-9000", None, u)
    assert len(pricer._lookup) == n + 1


# ---- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry,key",
    [
        ({"model": "a", "inputPerMillion": -1, "outputPerMillion": 1}, "pricing.models.0.inputPerMillion"),
        ({"model": "a", "outputPerMillion": 1}, "pricing.models.0.inputPerMillion: Field required"),
        ({"model": "a", "inputPerMillion": 1, "outputPerMillion": "cheap"}, "pricing.models.0.outputPerMillion"),
        ({"model": "a", "inputPerMillion": 1, "outputPerMillion": float("nan")}, "pricing.models.0.outputPerMillion"),
        (
            {"model": "a", "inputPerMillion": 1, "outputPerMillion": 1, "cachedInputPerMillion": -0.5},
            "pricing.models.0.cachedInputPerMillion",
        ),
        ({"model": "a", "inputPerMillion": 1, "outputPerMillion": 1, "cacheWritePerMillion": "x"}, "pricing.models.0.cacheWritePerMillion"),
        (
            {"model": "a", "inputPerMillion": 1, "outputPerMillion": 1, "cachedPerMillion": 1},
            "pricing.models.0.cachedPerMillion: unknown key",
        ),
        ({"modelRegex": "(", "inputPerMillion": 1, "outputPerMillion": 1}, "pricing.models.0.modelRegex: not a valid regular expression"),
        ({"inputPerMillion": 1, "outputPerMillion": 1}, "pricing.models.0: set exactly one of model or modelRegex"),
        ({"model": "a", "modelRegex": "a", "inputPerMillion": 1, "outputPerMillion": 1}, "pricing.models.0: set exactly one"),
        ({"model": "", "inputPerMillion": 1, "outputPerMillion": 1}, "pricing.models.0.model"),
        # bounded and finite: 0 .. 1e6 USD per million tokens (1e308 once made ai_cost_usd_total +Inf)
        (
            {"model": "a", "inputPerMillion": 1e308, "outputPerMillion": 1},
            "pricing.models.0.inputPerMillion: Input should be less than or equal to 1000000",
        ),
        (
            {"model": "a", "inputPerMillion": 1, "outputPerMillion": 1000001},
            "pricing.models.0.outputPerMillion: Input should be less than or equal to 1000000",
        ),
        (
            {"model": "a", "inputPerMillion": 1, "outputPerMillion": 1, "cachedInputPerMillion": 1e7},
            "pricing.models.0.cachedInputPerMillion: Input should be less",
        ),
        (
            {"model": "a", "inputPerMillion": 1, "outputPerMillion": 1, "cacheWritePerMillion": 2e6},
            "pricing.models.0.cacheWritePerMillion: Input should be less",
        ),
        (
            {"model": "a", "inputPerMillion": float("inf"), "outputPerMillion": 1},
            "pricing.models.0.inputPerMillion: Input should be a finite number",
        ),
    ],
)
def test_bad_override_names_the_key(entry: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"pricing": {"models": [entry]}}, "c.yaml")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_pricing_section_defaults_and_round_trip() -> None:
    cfg = parse({})
    assert cfg.pricing.enabled is True and cfg.pricing.models == []
    cfg = parse({"pricing": {"enabled": False, "models": [{"modelRegex": "^x", "inputPerMillion": 1, "outputPerMillion": 2}]}})
    assert parse(cfg.model_dump(by_alias=True)) == cfg  # what the CLI's overrides re-parse
    with pytest.raises(ConfigError, match="pricing.enabled"):
        parse({"pricing": {"enabled": "maybe"}})


def test_serve_exits_2_on_a_bad_price(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pricing:\n  models:\n  - model: acme-large\n    inputPerMillion: -2\n    outputPerMillion: 8\n")
    p = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "pricing.models.0.inputPerMillion" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_warm_loads_the_catalogue_once_before_the_first_call(monkeypatch):
    from genai_prices import data_snapshot

    real = data_snapshot.get_snapshot
    loads: list[int] = []
    monkeypatch.setattr(data_snapshot, "get_snapshot", lambda: loads.append(1) or real())
    pricer = Pricer(catalogue=catalogue_ids())
    pricer.warm()
    assert loads == [1]
    cost = pricer.price("openai", "gpt-4o-mini", None, Usage(input_tokens=2, output_tokens=12, total_tokens=14), None)
    assert loads == [1] and isinstance(cost, Cost)
    assert cost.total == 7.5e-06  # rounded to the pico-dollar: no 7.499999999999999e-06 in the access log
    Pricer(PricingConfig(enabled=False)).warm()  # disabled: nothing to load
    assert loads == [1]
