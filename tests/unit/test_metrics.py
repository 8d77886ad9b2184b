"""Metrics observer: counters and histograms move by exactly the usage of recorded calls.

Calls are built by feeding recorded provider responses (shared fixtures) through the real parsers,
with a fresh CollectorRegistry per test.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from extproc.apis.routing import Router, default_routes
from extproc.core import config as config_mod
from extproc.core.call import CLIENT_ABORT, ERROR, OK, Call
from extproc.telemetry.labels import OVERFLOW, LabelGuard, metadata_value
from extproc.telemetry.metrics import TOKEN_BUCKETS, MetricsObserver, error_type
from tests.support.recordings import load

JWT = "envoy.filters.http.jwt_authn"
TEAM_LABELS = {
    "customLabels": [
        {"name": "team", "metadataKey": "principal:team"},
        {"name": "user_id", "metadataKey": "principal:sub", "metadataNamespace": JWT},
        {"name": "tenant", "header": "X-Tenant"},
    ]
}


def _stats(**kw: Any) -> config_mod.StatsConfig:
    return config_mod.parse({"stats": kw}).stats


def _claims(**claims: Any) -> dict[str, struct_pb2.Struct]:
    s = struct_pb2.Struct()
    s.update({"principal": claims})
    return {JWT: s}


def _call(
    fixture: str,
    *,
    path: str | None = None,
    request: bytes | None = None,
    forwarded: Any = None,
    headers: dict[str, str] | None = None,
    times: tuple[float, float, float] = (0.0, 0.5, 2.0),
) -> Call:
    """A finished Call as the servicer would report it for this recording."""
    rec = load(fixture)
    path = path or rec.path
    match = Router(default_routes()).resolve(path)
    assert match is not None, path
    call = Call(path=path, forwarded=forwarded, headers=headers or {})
    parser = match.parser(call.obs, path_model=match.path_model)
    call.api, call.provider = parser.api, match.provider or parser.default_provider
    parser.feed_request(request if request is not None else (rec.request_body or b""))
    call.status = rec.status
    parser.start_response(rec.status, rec.content_type)
    parser.feed_response(rec.body, True)
    call.start, call.first_chunk, call.end = times
    call.response_start = times[1]
    call.outcome = ERROR if rec.status >= 400 else OK
    return call


def _observer(**stats: Any) -> tuple[MetricsObserver, CollectorRegistry]:
    reg = CollectorRegistry()
    return MetricsObserver(_stats(**stats), reg), reg


def _v(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


GENAI = dict(
    gen_ai_operation_name="chat",
    gen_ai_provider_name="openai",
    gen_ai_request_model="gpt-5-nano",
    gen_ai_response_model="gpt-5-nano-2025-08-07",
)


def test_non_streaming_chat_counts_exact_usage():
    obs, reg = _observer()
    call = _call("aigw__chat-basic.yaml")  # prompt 8, completion 377, reasoning 320, cached 0
    obs.on_call_end(call)
    obs.on_call_end(call)
    assert _v(reg, "ai_prompt_tokens_total", llm="openai", model="gpt-5-nano") == 16
    assert _v(reg, "ai_completion_tokens_total", llm="openai", model="gpt-5-nano") == 754
    for token_type, n in (("input", 8), ("output", 377), ("reasoning", 320), ("cached_input", 0)):
        labels = {**GENAI, "gen_ai_token_type": token_type}
        assert _v(reg, "gen_ai_client_token_usage_sum", **labels) == 2 * n
        assert _v(reg, "gen_ai_client_token_usage_count", **labels) == 2
    le_8 = {**GENAI, "gen_ai_token_type": "input", "le": "16.0"}
    assert _v(reg, "gen_ai_client_token_usage_bucket", **le_8) == 2
    assert _v(reg, "gen_ai_client_token_usage_bucket", **{**le_8, "le": "4.0"}) == 0
    dur = {**GENAI, "error_type": ""}
    assert _v(reg, "gen_ai_client_operation_duration_seconds_sum", **dur) == pytest.approx(4.0)
    assert _v(reg, "gen_ai_client_operation_duration_seconds_count", **dur) == 2
    assert _v(reg, "gen_ai_server_time_to_first_token_seconds_count", **dur) == 0  # not a stream
    assert (
        _v(reg, "ai_requests_total", llm="openai", model="gpt-5-nano", operation="chat", status_code="200", outcome="ok", error_type="")
        == 2
    )
    assert _v(reg, "ai_usage_missing_total", llm="openai", model="gpt-5-nano", operation="chat") == 0


def test_stream_with_usage_records_ttft_and_time_per_output_token():
    obs, reg = _observer()
    call = _call("aigw__chat-streaming-detailed-usage.yaml", times=(10.0, 10.3, 12.3))  # 12 in, 100 out
    assert call.obs.streaming
    obs.on_call_end(call)
    assert _v(reg, "ai_prompt_tokens_total", llm="openai", model="gpt-5-nano") == 12
    assert _v(reg, "ai_completion_tokens_total", llm="openai", model="gpt-5-nano") == 100
    lab = {**GENAI, "error_type": ""}
    assert _v(reg, "gen_ai_server_time_to_first_token_seconds_sum", **lab) == pytest.approx(0.3)
    assert _v(reg, "gen_ai_server_time_to_first_token_seconds_count", **lab) == 1
    assert _v(reg, "gen_ai_server_time_per_output_token_seconds_sum", **lab) == pytest.approx(2.0 / 99)


def test_legacy_completion_stream_and_embeddings():
    obs, reg = _observer()
    obs.on_call_end(_call("aigw__completion-streaming-usage.yaml"))  # babbage-002: 31 in, 25 out
    obs.on_call_end(_call("aigw__embeddings-dimensions.yaml"))  # 5 in, no output
    assert _v(reg, "ai_prompt_tokens_total", llm="openai", model="babbage-002") == 31
    assert _v(reg, "ai_completion_tokens_total", llm="openai", model="babbage-002") == 25
    assert _v(reg, "ai_prompt_tokens_total", llm="openai", model="text-embedding-3-small") == 5
    assert reg.get_sample_value("ai_completion_tokens_total", {"llm": "openai", "model": "text-embedding-3-small"}) is None
    emb = dict(
        gen_ai_operation_name="embeddings",
        gen_ai_provider_name="openai",
        gen_ai_request_model="text-embedding-3-small",
        gen_ai_response_model="text-embedding-3-small",
    )
    assert _v(reg, "gen_ai_client_token_usage_sum", **emb, gen_ai_token_type="input") == 5
    assert reg.get_sample_value("gen_ai_client_token_usage_count", {**emb, "gen_ai_token_type": "output"}) is None


def test_stream_without_usage_is_counted_missing():
    obs, reg = _observer()
    obs.on_call_end(_call("aigw__chat-streaming.yaml"))  # recorded without include_usage
    assert _v(reg, "ai_usage_missing_total", llm="openai", model="gpt-5-nano", operation="chat") == 1
    assert reg.get_sample_value("ai_prompt_tokens_total", {"llm": "openai", "model": "gpt-5-nano"}) is None
    assert _v(reg, "gen_ai_server_time_to_first_token_seconds_count", **GENAI, error_type="") == 1


def test_error_response_counts_error_type():
    obs, reg = _observer()
    call = _call("aigw__chat-bad-request.yaml")
    assert call.status == 400
    obs.on_call_end(call)
    model = call.obs.request_model
    assert (
        _v(
            reg,
            "ai_requests_total",
            llm="openai",
            model=model,
            operation="chat",
            status_code="400",
            outcome="error",
            error_type="unsupported_parameter",
        )
        == 1
    )  # error.code before error.type
    assert _v(reg, "ai_usage_missing_total", llm="openai", model=model, operation="chat") == 0
    # error rate as one PromQL line: sum(ai_requests_total{outcome!="ok"}) / sum(ai_requests_total)
    assert (
        sum(
            s.value
            for m in reg.collect()
            if m.name == "ai_requests"
            for s in m.samples
            if s.name == "ai_requests_total" and s.labels["outcome"] != "ok"
        )
        == 1
    )


def test_error_type_values():
    c = Call(outcome=OK)
    assert error_type(c) == ""
    c = Call(outcome=ERROR, status=503)
    assert error_type(c) == "503"
    c.obs.error_type = "rate_limit_exceeded"
    assert error_type(c) == "rate_limit_exceeded"
    assert error_type(Call(outcome=CLIENT_ABORT, status=200)) == "client_abort"


def test_parse_errors_counted_by_reason():
    obs, reg = _observer()
    call = _call("aigw__chat-basic.yaml", request=b"{not json")
    assert call.obs.parse_errors == 1
    obs.on_call_end(call)
    assert _v(reg, "ai_parse_errors_total", llm="openai", reason="request_json") == 1


def test_non_llm_paths_are_not_accounted():
    obs, reg = _observer()
    obs.on_stream_start()
    obs.on_call_end(Call(api="unknown", status=200, outcome=OK, start=0, end=1))
    assert not [s for m in reg.collect() for s in m.samples if s.name != "ai_active_streams"]
    assert reg.get_sample_value("ai_active_streams") == 0  # the stream was in flight, and is gone


def test_active_streams_follow_the_streams_in_flight():
    obs, reg = _observer()
    for _ in range(3):
        obs.on_stream_start()
    assert reg.get_sample_value("ai_active_streams") == 3
    obs.on_call_end(Call(api="unknown", status=200, outcome=OK, start=0, end=1))
    assert reg.get_sample_value("ai_active_streams") == 2


def test_custom_labels_from_forwarded_metadata_and_header():
    obs, reg = _observer(**TEAM_LABELS)
    alice = _claims(sub="alice", team="dev")
    bob = _claims(sub="bob", team="ops")
    obs.on_call_end(_call("aigw__chat-basic.yaml", forwarded=alice, headers={"x-tenant": "acme"}))
    obs.on_call_end(_call("aigw__chat-detailed-usage.yaml", forwarded=alice))  # 12 in, 100 out
    obs.on_call_end(_call("aigw__chat-basic.yaml", forwarded=bob))
    obs.on_call_end(_call("aigw__chat-basic.yaml"))  # no token: empty labels
    base = {"llm": "openai", "model": "gpt-5-nano"}
    assert _v(reg, "ai_prompt_tokens_total", **base, team="dev", user_id="alice", tenant="acme") == 8
    assert _v(reg, "ai_prompt_tokens_total", **base, team="dev", user_id="alice", tenant="") == 12
    assert _v(reg, "ai_prompt_tokens_total", **base, team="ops", user_id="bob", tenant="") == 8
    assert _v(reg, "ai_prompt_tokens_total", **base, team="", user_id="", tenant="") == 8
    assert _v(reg, "gen_ai_client_token_usage_sum", **GENAI, gen_ai_token_type="output", team="ops", user_id="bob", tenant="") == 377


def test_metadata_value_kinds():
    s = struct_pb2.Struct()
    s.update({"principal": {"sub": "alice", "n": 3, "f": 1.5, "ok": True, "deep": {"x": "y"}, "list": [1]}})
    fw = {JWT: s}
    get = lambda key: metadata_value(fw, JWT, tuple(key.split(":")))  # noqa: E731
    assert get("principal:sub") == "alice"
    assert get("principal:n") == "3"
    assert get("principal:f") == "1.5"
    assert get("principal:ok") == "true"
    assert get("principal:deep:x") == "y"
    assert get("principal:deep") == "" and get("principal:list") == "" and get("principal:none") == ""
    assert get("principal:sub:x") == ""
    assert metadata_value(fw, "other.ns", ("principal", "sub")) == ""
    assert metadata_value(None, JWT, ("principal", "sub")) == ""


def test_cardinality_cap_folds_and_counts_overflow():
    cap = 5
    obs, reg = _observer(maxLabelValues=cap, **TEAM_LABELS)
    users = [f"user{i}" for i in range(10 * cap)]
    for u in users:
        obs.on_call_end(_call("aigw__chat-basic.yaml", forwarded=_claims(sub=u, team="dev")))
    series = [s for m in reg.collect() for s in m.samples if s.name == "ai_prompt_tokens_total"]
    assert len(series) == cap + 1  # cap real users + __overflow__
    assert sum(s.value for s in series) == 8 * len(users)  # nothing lost
    over = [s for s in series if s.labels["user_id"] == OVERFLOW]
    assert over[0].value == 8 * (len(users) - cap)
    assert _v(reg, "ai_label_values_overflow_total", label="user_id") == len(users) - cap
    # the model label is capped the same way (a client picks the model string)
    for i in range(3 * cap):
        call = _call("aigw__chat-basic.yaml", request=b'{"model":"m%d","messages":[]}' % i)
        obs.on_call_end(call)
    models = {s.labels["model"] for m in reg.collect() if m.name == "ai_requests" for s in m.samples}
    assert len(models) <= cap + 1 and OVERFLOW in models
    assert _v(reg, "ai_label_values_overflow_total", label="model") > 0


def test_label_guard_keeps_known_values_after_cap():
    g = LabelGuard(2)
    assert [g.fold("a", v) for v in ("x", "y", "z", "x", "", "y")] == ["x", "y", OVERFLOW, "x", "", "y"]
    assert g.take_overflows() == {"a": 1} and g.take_overflows() == {}


def test_observer_never_raises():
    obs, reg = _observer()
    call = _call("aigw__chat-basic.yaml")
    call.obs.usage.input_tokens = -5  # Counter.inc refuses negatives: the observer must swallow it
    obs.on_call_end(call)
    assert obs.failures == 1
    obs.on_call_end(_call("aigw__chat-basic.yaml"))  # and keeps working
    assert obs.failures == 1


def test_token_buckets_follow_semconv_advice():
    assert TOKEN_BUCKETS[0] == 1 and TOKEN_BUCKETS[-1] == 4 * 1024 * 1024
    assert all(b == a * 4 for a, b in zip(TOKEN_BUCKETS, TOKEN_BUCKETS[1:]))


@pytest.mark.parametrize(
    "label,error",
    [
        ({"name": "model", "metadataKey": "principal:sub"}, "stats.customLabels.0.name"),
        ({"name": "le", "header": "x"}, "stats.customLabels.0.name"),
        ({"name": "bad-name", "header": "x"}, "stats.customLabels.0.name"),
        ({"name": "__x", "header": "x"}, "stats.customLabels.0.name"),
        ({"name": "a", "header": "x", "metadataKey": "principal:sub"}, "stats.customLabels.0"),
        ({"name": "a"}, "stats.customLabels.0"),
    ],
)
def test_bad_custom_label_names_the_key(label, error):
    with pytest.raises(config_mod.ConfigError, match=error.replace(".", r"\.")):
        config_mod.parse({"stats": {"customLabels": [label]}})


def test_duplicate_custom_label():
    with pytest.raises(config_mod.ConfigError, match="stats.customLabels: .*duplicate label name 'team'"):
        config_mod.parse({"stats": {"customLabels": [{"name": "team", "header": "a"}, {"name": "team", "header": "b"}]}})


def test_series_budget_caps_every_family_and_counts_folds():
    """100 models x 7 providers, every value under its label's cap: each family keeps maxSeries
    series plus its overflow ones; no token is lost; each folded call is counted."""
    budget = 12
    obs, reg = _observer(maxSeries=budget)
    n = 100
    for i in range(n):
        call = _call("aigw__chat-basic.yaml", request=b'{"model":"m%d","messages":[]}' % i)
        call.provider = f"p{i % 7}"
        obs.on_call_end(call)
    per_family: dict[str, set] = {}
    for m in reg.collect():
        for s in m.samples:
            per_family.setdefault(m.name, set()).add(tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")))
    for family in ("ai_requests", "ai_prompt_tokens", "gen_ai_client_operation_duration_seconds", "gen_ai_client_token_usage"):
        real = [ls for ls in per_family[family] if OVERFLOW not in dict(ls).values()]
        assert len(real) <= budget, family
        assert obs.budget.series(family) <= budget
    # a histogram label set is 19 series (17 buckets, _sum, _count): 40 admits two of them
    wide, wreg = _observer(maxSeries=40)
    for i in range(5):
        wide.on_call_end(_call("aigw__chat-basic.yaml", request=b'{"model":"w%d","messages":[]}' % i))
    assert wide.budget.live("gen_ai_client_operation_duration_seconds") == 2
    assert wide.budget.series("gen_ai_client_operation_duration_seconds") == 38
    assert _v(wreg, "ai_series_overflow_total", metric="gen_ai_client_operation_duration_seconds") == 3
    assert _v(reg, "ai_prompt_tokens_total", llm=OVERFLOW, model=OVERFLOW) > 0
    assert sum(s.value for m in reg.collect() for s in m.samples if s.name == "ai_prompt_tokens_total") == 8 * n
    folded_requests = _v(reg, "ai_series_overflow_total", metric="ai_requests")
    assert folded_requests == n - budget
    assert (
        _v(reg, "ai_requests_total", llm=OVERFLOW, model=OVERFLOW, operation=OVERFLOW, status_code=OVERFLOW, outcome="ok", error_type="")
        == n - budget
    )


def test_a_folded_label_set_is_folded_and_counted_at_every_call():
    """Past the budget, the same label set again and again: each call lands in the overflow
    series and is counted in ai_series_overflow_total by the time its ai_requests_total is."""
    obs, reg = _observer(maxSeries=1)  # one label set per counter family, none for histograms (19 series each)
    obs.on_call_end(_call("aigw__chat-basic.yaml", request=b'{"model":"first","messages":[]}'))
    folded_requests = dict(llm=OVERFLOW, model=OVERFLOW, operation=OVERFLOW, status_code=OVERFLOW, outcome="ok", error_type="")
    for i in range(1, 6):
        obs.on_call_end(_call("aigw__chat-basic.yaml", request=b'{"model":"second","messages":[]}'))
        assert _v(reg, "ai_requests_total", **folded_requests) == i
        assert _v(reg, "ai_series_overflow_total", metric="ai_requests") == i
        assert _v(reg, "ai_series_overflow_total", metric="gen_ai_client_operation_duration_seconds") == i + 1
        assert _v(reg, "ai_prompt_tokens_total", llm=OVERFLOW, model=OVERFLOW) == 8 * i
    assert obs.budget.live("ai_requests") == 1


def test_series_budget_costs_nothing_for_known_label_sets():
    obs, reg = _observer(maxSeries=3)
    call = _call("aigw__chat-basic.yaml")
    for _ in range(50):
        obs.on_call_end(call)
    assert (
        _v(reg, "ai_requests_total", model="gpt-5-nano", llm="openai", operation="chat", status_code="200", outcome="ok", error_type="")
        == 50
    )
    assert _v(reg, "ai_series_overflow_total", metric="ai_requests") == 0
    assert obs.budget.live("ai_requests") == 1


def test_mcp_tool_names_fold_under_both_caps():
    from extproc.telemetry.mcp import MCP_REQUESTS, McpMetrics

    obs, reg = _observer(maxLabelValues=3, maxSeries=100)
    mcp = McpMetrics(_stats(maxLabelValues=3, maxSeries=100), obs.metrics)

    def tools_call(tool: str) -> Call:
        call = Call(api="mcp", provider="mcp", status=200, outcome=OK)
        call.obs.extra.update({"mcp.method": "tools/call", "mcp.tool": tool})
        return call

    before = MCP_REQUESTS.labels("tools/call", OVERFLOW, "ok")._value.get()
    for i in range(10):
        mcp.on_call_end(tools_call(f"unit-tool-{i}-" + "x" * 300))
    assert MCP_REQUESTS.labels("tools/call", OVERFLOW, "ok")._value.get() - before == 7
    assert _v(reg, "ai_label_values_overflow_total", label="mcp_tool") == 7
    assert mcp.budget.live("mcp_requests") == 3 + 1 and all(len(t[1]) <= 128 for t in mcp._children)  # + __overflow__
    # and the series budget alone: methods x statuses x tools past maxSeries fold too
    tight = McpMetrics(_stats(maxSeries=2), obs.metrics)
    for i in range(5):
        tight.on_call_end(tools_call(f"t{i}"))
    assert tight.budget.live("mcp_requests") == 2
    assert _v(reg, "ai_series_overflow_total", metric="mcp_requests") == 3


def test_junk_mcp_methods_do_not_take_the_genai_operations_label_values():
    """5,000 distinct junk MCP methods, then real calls: chat and embeddings keep their
    operation; the MCP calls are recorded under operation="other", their own bounded set."""
    from extproc.apis.mcp import McpParser

    obs, reg = _observer()  # the default cap: 1,000 values per label
    for i in range(5000):
        call = Call(path="/mcp", api="mcp", provider="mcp", status=200, outcome=OK)
        McpParser(call.obs).on_request_json({"jsonrpc": "2.0", "id": i, "method": f"junk/{i}"})
        obs.on_call_end(call)
    obs.on_call_end(_call("aigw__chat-basic.yaml"))
    embeddings = _call("aigw__embeddings-dimensions.yaml")
    obs.on_call_end(embeddings)
    assert (
        _v(reg, "ai_requests_total", model="gpt-5-nano", llm="openai", operation="chat", status_code="200", outcome="ok", error_type="")
        == 1
    )
    assert (
        _v(
            reg,
            "ai_requests_total",
            model=embeddings.obs.request_model,
            llm="openai",
            operation="embeddings",
            status_code="200",
            outcome="ok",
            error_type="",
        )
        == 1
    )
    assert (
        _v(reg, "ai_requests_total", model="unknown", llm="mcp", operation="other", status_code="200", outcome="ok", error_type="") == 5000
    )
    assert _v(reg, "ai_label_values_overflow_total", label="operation") == 0


def test_refused_streams_are_counted_by_reason():
    reg = CollectorRegistry()
    obs = MetricsObserver(_stats(), reg)
    obs.on_stream_refused("max_streams")
    obs.on_stream_refused("overloaded")
    obs.on_stream_refused("overloaded")
    assert reg.get_sample_value("ai_streams_refused_total", {"reason": "overloaded"}) == 2
    assert reg.get_sample_value("ai_streams_refused_total", {"reason": "max_streams"}) == 1
