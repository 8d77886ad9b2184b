"""One meaning per token count, whatever the API (docs/metrics.md, Token semantics): input = every
input token processed (uncached + cache read + cache write), output = every output token billed
(visible + reasoning), total = the provider's total else input + output. Cost is unchanged by it:
every recorded fixture prices to the dollars the previous release computed."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from extproc.apis.routing import catalogue_ids
from extproc.core import config
from extproc.core.call import Call
from extproc.core.config import parse
from extproc.core.observation import Usage
from extproc.core.pricing import Cost, Pricer
from extproc.server.processor import Processor
from extproc.telemetry.metadata import fields
from extproc.telemetry.metrics import MetricsObserver
from tests.support import REPO, recordings
from tests.support.provider_cases import CASES, JSON, ROUTER, SSE, Case, invoke_chunk, new_parser, sse, units
from tests.unit.test_processor import Recorder, body, headers, meta, req_headers, run

TABLE = json.loads((REPO / "tests" / "fixtures" / "pricing" / "fixture_costs.json").read_text())
OVERRIDE = {
    "pricing": {
        "models": [
            {
                "modelRegex": ".",
                "inputPerMillion": 3.0,
                "outputPerMillion": 15.0,
                "cachedInputPerMillion": 0.3,
                "cacheWritePerMillion": 3.75,
            }
        ]
    }
}
CATALOGUE = Pricer(catalogue=catalogue_ids())
OVERRIDDEN = Pricer(parse(OVERRIDE).pricing, catalogue_ids())

# The previous release's reading of each API (its pricing normalise), written apart from the code:
# which reported counts leave out cache (input) or reasoning (output).
INPUT_EXCLUDES_CACHE = ("anthropic.", "vertex.anthropic", "bedrock.")
OUTPUT_EXCLUDES_REASONING = ("gemini.",)


def _cases() -> list[Case]:
    named = {c.file for c in CASES if c.file}
    extra = []
    for path in sorted(recordings.fixtures_dir().iterdir()):
        if path.suffix in (".yaml", ".json", ".sse", ".bin") and path.name not in named:
            r = recordings.load(path.name)
            extra.append(Case("file:" + path.name, r.path, r.content_type, {}, file=path.name, status=r.status, request=r.request_body))
    return [*CASES, *extra]


def _prefixes() -> list[tuple[str, Case, list[bytes]]]:
    out = []
    for case in _cases():
        data = case.load()
        whole = case.content_type == JSON and not case.name.startswith("gemini_stream_json")
        parts = [data] if whole else [raw for raw, _ in units(data, case.content_type)] or [data]
        for n in range(1, len(parts) + 1):
            out.append((f"{case.name}@{n}/{len(parts)}", case, parts[:n]))
    return out


PREFIXES = _prefixes()


def _replay(case: Case, parts: list[bytes], whole: int) -> tuple[Any, Any]:
    parser, obs = new_parser(case)
    for i, part in enumerate(parts):
        parser.feed_response(part, len(parts) == whole and i == whole - 1)
    return parser, obs


def _priced(pricer: Pricer, provider: str, obs: Any) -> Any:
    c = pricer.price(provider, obs.request_model, obs.response_model, obs.usage, obs.extra.get("service_tier"))
    return [c.total, c.input, c.output, c.model] if isinstance(c, Cost) else c.reason


# The table froze the recordings of the release before the change; recordings added since (a new
# provider's) have no earlier dollars to match and are checked by their provider cases instead.
FROZEN = [(key, case, parts) for key, case, parts in PREFIXES if key in TABLE]


def test_every_recording_the_table_froze_is_still_checked():
    """None of the frozen recordings was dropped, renamed or re-cut (its key names its units)."""
    assert set(TABLE) - {key for key, _, _ in PREFIXES} == set()
    assert len(FROZEN) == len(TABLE) > 190
    assert sum(isinstance(v["catalogue"], list) for v in TABLE.values()) > 60  # most are catalogue-priced


@pytest.mark.parametrize("key,case,parts", FROZEN, ids=[k for k, _, _ in FROZEN])
def test_every_fixture_costs_what_it_did_before_and_its_usage_is_normalised(key, case, parts):
    want = TABLE[key]
    whole = int(key.rsplit("/", 1)[1])
    parser, obs = _replay(case, parts, whole)
    match = ROUTER.resolve(case.path)
    provider = match.provider or parser.default_provider
    assert _priced(CATALOGUE, provider, obs) == want["catalogue"]
    assert _priced(OVERRIDDEN, provider, obs) == want["override"]

    inp, out, total, read, write, reasoning = want["reported"]  # as the provider sent them
    if parser.api.startswith(INPUT_EXCLUDES_CACHE) and (inp, read, write) != (None, None, None):
        inp = (inp or 0) + (read or 0) + (write or 0)
    if parser.api.startswith(OUTPUT_EXCLUDES_REASONING) and (out, reasoning) != (None, None):
        out = (out or 0) + (reasoning or 0)
    u = obs.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens, u.cached_input_tokens, u.cache_creation_input_tokens, u.reasoning_tokens) == (
        inp,
        out,
        total,
        read,
        write,
        reasoning,
    )


# ---- the per-API table of docs/metrics.md -----------------------------------------------------
def _usage(path: str, content_type: str, data: bytes) -> tuple[int | None, ...]:
    parser, obs = new_parser(Case("t", path, content_type, {}, body=data))
    parser.feed_response(data, True)
    u = obs.usage
    return u.input_tokens, u.output_tokens, u.total(), u.cached_input_tokens, u.cache_creation_input_tokens, u.reasoning_tokens


_CONVERSE = {
    "usage": {"inputTokens": 500, "outputTokens": 40, "totalTokens": 2840, "cacheReadInputTokens": 2000, "cacheWriteInputTokens": 300},
    "stopReason": "end_turn",
}
_ANTHROPIC = {
    "type": "message",
    "model": "claude-x",
    "stop_reason": "end_turn",
    "content": [],
    "usage": {"input_tokens": 500, "output_tokens": 40, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 300},
}
API_TABLE = {
    # API: (path, content type, body) -> (input, output, total, cached, cache creation, reasoning)
    "openai.chat": (
        (
            "/v1/chat/completions",
            JSON,
            {
                "model": "m",
                "choices": [],
                "usage": {
                    "prompt_tokens": 2800,
                    "completion_tokens": 40,
                    "total_tokens": 2840,
                    "prompt_tokens_details": {"cached_tokens": 2000},
                    "completion_tokens_details": {"reasoning_tokens": 30},
                },
            },
        ),
        (2800, 40, 2840, 2000, None, 30),
    ),
    "openai.completions": (
        (
            "/v1/completions",
            JSON,
            {
                "model": "m",
                "choices": [],
                "usage": {
                    "prompt_tokens": 2800,
                    "completion_tokens": 40,
                    "total_tokens": 2840,
                    "prompt_tokens_details": {"cached_tokens": 2000},
                },
            },
        ),
        (2800, 40, 2840, 2000, None, None),
    ),
    "openai.embeddings": (
        ("/v1/embeddings", JSON, {"model": "m", "data": [], "usage": {"prompt_tokens": 2800, "total_tokens": 2800}}),
        (2800, None, 2800, None, None, None),
    ),
    "openai.responses": (
        (
            "/v1/responses",
            JSON,
            {
                "model": "m",
                "status": "completed",
                "usage": {
                    "input_tokens": 2800,
                    "output_tokens": 40,
                    "total_tokens": 2840,
                    "input_tokens_details": {"cached_tokens": 2000},
                    "output_tokens_details": {"reasoning_tokens": 30},
                },
            },
        ),
        (2800, 40, 2840, 2000, None, 30),
    ),
    "anthropic.messages": (("/v1/messages", JSON, _ANTHROPIC), (2800, 40, 2840, 2000, 300, None)),
    "vertex.anthropic": (
        ("/v1/projects/p/locations/l/publishers/anthropic/models/claude-x:rawPredict", JSON, _ANTHROPIC),
        (2800, 40, 2840, 2000, 300, None),
    ),
    "bedrock.converse": (("/model/anthropic.claude-x/converse", JSON, _CONVERSE), (2800, 40, 2840, 2000, 300, None)),
    "bedrock.invoke (Claude)": (("/model/anthropic.claude-x/invoke", JSON, _ANTHROPIC), (2800, 40, 2840, 2000, 300, None)),
    "bedrock.invoke (Nova)": (
        (
            "/model/amazon.nova-pro-v1:0/invoke",
            JSON,
            {"usage": {"inputTokens": 500, "outputTokens": 40, "cacheReadInputTokenCount": 2000, "cacheWriteInputTokenCount": 300}},
        ),
        (2800, 40, 2840, 2000, 300, None),
    ),
    "bedrock.invoke (Llama)": (
        (
            "/model/meta.llama3-70b-instruct-v1:0/invoke",
            JSON,
            {"generation": "x", "prompt_token_count": 2800, "generation_token_count": 40, "stop_reason": "stop"},
        ),
        (2800, 40, 2840, None, None, None),
    ),
    "bedrock.invoke (invocationMetrics)": (
        (
            "/model/mistral.mistral-large-2402-v1:0/invoke",
            JSON,
            {
                "outputs": [{"text": "x", "stop_reason": "stop"}],
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 500,
                    "outputTokenCount": 40,
                    "cacheReadInputTokenCount": 2000,
                    "cacheWriteInputTokenCount": 300,
                },
            },
        ),
        (2800, 40, 2840, 2000, 300, None),
    ),
    "gemini.generate_content": (
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            JSON,
            {
                "usageMetadata": {
                    "promptTokenCount": 2800,
                    "candidatesTokenCount": 40,
                    "thoughtsTokenCount": 30,
                    "totalTokenCount": 2870,
                    "cachedContentTokenCount": 2000,
                }
            },
        ),
        (2800, 70, 2870, 2000, None, 30),
    ),
    "gemini.embed_content": (
        (
            "/v1/projects/p/locations/l/publishers/google/models/text-embedding-005:embedContent",
            JSON,
            {"embedding": {"values": []}, "usageMetadata": {"promptTokenCount": 2800, "totalTokenCount": 2800}},
        ),
        (2800, None, 2800, None, None, None),
    ),
    "cohere.chat": (
        (
            "/v2/chat",
            JSON,
            {
                "finish_reason": "COMPLETE",
                "usage": {"tokens": {"input_tokens": 2800, "output_tokens": 40}, "billed_units": {"input_tokens": 5}},
            },
        ),
        (2800, 40, 2840, None, None, None),
    ),
    "cohere.embed (billed units only)": (
        ("/v2/embed", JSON, {"id": "x", "embeddings": {}, "meta": {"billed_units": {"input_tokens": 2800}}}),
        (2800, None, 2800, None, None, None),
    ),
    "ollama.chat": (
        ("/api/chat", JSON, {"model": "m", "done": True, "prompt_eval_count": 2800, "eval_count": 40}),
        (2800, 40, 2840, None, None, None),
    ),
}


@pytest.mark.parametrize("api", API_TABLE)
def test_every_api_reports_input_and_output_in_one_meaning(api):
    (path, content_type, obj), want = API_TABLE[api]
    assert _usage(path, content_type, orjson.dumps(obj)) == want


def test_every_api_of_the_documented_table_has_a_case_here():
    """docs/metrics.md's Token semantics table names parser ``api`` ids (``cohere.*``: all of
    Cohere's); each is checked by a case of API_TABLE, so the table cannot promise what no test
    reads."""
    text = (REPO / "docs" / "metrics.md").read_text().split("## Token semantics", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| ") and "`" in line.split("|")[1]]
    documented = {api for row in rows for api in re.findall(r"`([a-z]+\.[a-z_*]+)`", row)}
    assert len(documented) >= 10
    assert sorted(api for api in documented if not any(case.split(" ")[0].startswith(api.rstrip("*")) for case in API_TABLE)) == []


def _anthropic_events(*extra_delta_usage: dict) -> list[tuple[str, dict]]:
    start = {
        "type": "message_start",
        "message": {
            "id": "m",
            "model": "claude-x",
            "usage": {"input_tokens": 500, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 300, "output_tokens": 1},
        },
    }
    deltas = [("message_delta", {"type": "message_delta", "delta": {"stop_reason": None}, "usage": u}) for u in extra_delta_usage]
    return [("message_start", start), *deltas, ("message_stop", {"type": "message_stop"})]


@pytest.mark.parametrize(
    "deltas",
    [
        ({"output_tokens": 20}, {"output_tokens": 40}),
        # message_delta repeating the cumulative input and cache: recomputed, never added twice
        ({"input_tokens": 500, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 300, "output_tokens": 40},),
        (
            {"output_tokens": 20},
            {"input_tokens": 500, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 300, "output_tokens": 40},
        ),
    ],
    ids=["output only", "full usage once", "full usage after an output-only delta"],
)
def test_an_anthropic_stream_sums_the_latest_pieces(deltas):
    for transport in ("sse", "bedrock"):
        events = _anthropic_events(*deltas)
        if transport == "sse":
            got = _usage("/v1/messages", SSE, sse(*events))
        else:
            data = b"".join(invoke_chunk(e) for _, e in events)
            got = _usage("/model/anthropic.claude-x/invoke-with-response-stream", "application/vnd.amazon.eventstream", data)
        assert got == (2800, 40, 2840, 2000, 300, None), transport


def test_a_later_smaller_cache_count_replaces_the_earlier_one():
    events = _anthropic_events({"input_tokens": 500, "cache_read_input_tokens": 0, "output_tokens": 40})
    assert _usage("/v1/messages", SSE, sse(*events))[:2] == (800, 40)


# ---- the outputs read it: sum by (team) is comparable across providers -------------------------
def _call(path: str, team: str, request: bytes, response: bytes) -> tuple[Call, dict]:
    rec = Recorder()
    replies = run(
        Processor(parse({}), [rec]),
        [
            req_headers(path, x_team=team),
            body("request_body", request, end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", response, end=True),
        ],
    )
    return rec.calls[0], meta(replies[-1])


def test_openai_and_anthropic_cached_calls_count_the_same_input():
    """OpenAI: prompt 2,800 including 2,000 cached. Anthropic: 500 + 2,000 cache read + 300 cache
    write. Both processed 2,800 input tokens, and every output says so."""
    openai, openai_meta = _call(
        "/v1/chat/completions",
        "a",
        b'{"model":"gpt-4o-mini"}',
        orjson.dumps(
            {
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": 2800,
                    "completion_tokens": 40,
                    "total_tokens": 2840,
                    "prompt_tokens_details": {"cached_tokens": 2000},
                },
            }
        ),
    )
    claude, claude_meta = _call("/v1/messages", "b", b'{"model":"claude-sonnet-4-20250514"}', orjson.dumps(_ANTHROPIC))
    for m in (openai_meta, claude_meta):
        assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"]) == (2800, 40, 2840)
    assert claude_meta["cached_tokens"] == 2000 and claude_meta["cache_creation_tokens"] == 300

    stats = config.StatsConfig.model_validate({"customLabels": [{"name": "team", "header": "x-team"}]})
    registry = CollectorRegistry()
    observer = MetricsObserver(stats, registry)
    for call in (openai, claude):
        call.headers["x-team"] = "platform"
        observer.record(call)

    def summed(metric: str, **match: str) -> float:
        return sum(
            s.value
            for fam in registry.collect()
            for s in fam.samples
            if s.name == metric and s.labels.get("team") == "platform" and all(s.labels.get(k) == v for k, v in match.items())
        )

    assert summed("ai_prompt_tokens_total") == 5600  # sum by (team): 2,800 + 2,800
    assert summed("gen_ai_client_token_usage_sum", gen_ai_token_type="input") == 5600
    assert summed("gen_ai_client_token_usage_sum", gen_ai_token_type="cached_input") == 4000
    assert fields(claude)["prompt_tokens"] == 2800


def test_budget_input_token_units_count_the_cache_too():
    from extproc.telemetry.metadata import Budget

    budget = Budget(parse({"budgets": {"enabled": True, "unit": "input_tokens"}}).budgets)
    call = Call()
    call.obs.usage = Usage(input_tokens=2800, output_tokens=40, cached_input_tokens=2000, cache_creation_input_tokens=300)
    assert budget.cost(call) == 2800
