"""``extproc.telemetry.otel_compat`` records straight into the OpenTelemetry SDK's aggregations:
the exported metrics must equal, point by point, what the SDK's own API produces for the same
calls (every instrument, several attribute sets, past the cardinality limit, delta and cumulative
temporality, over several collections), and each private detail it uses must still exist."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Counter, Histogram, UpDownCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter, MetricExportResult, MetricsData

from extproc.core.config import parse
from extproc.telemetry import otel_compat
from extproc.telemetry.measurements import LABELS, TOKEN_TYPES, Measurements
from extproc.telemetry.otlp_metrics import OtlpMetrics

DELTA = {k: AggregationTemporality.DELTA for k in (Counter, UpDownCounter, Histogram)}


class Keep(MetricExporter):
    """Keeps every export."""

    def __init__(self, temporality: dict) -> None:
        super().__init__(preferred_temporality=temporality, preferred_aggregation={})
        self.exports: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


class PlainApi(OtlpMetrics):
    """Records through the SDK's public API (``add``/``record`` with the attributes each time),
    as the sidecar did before otel_compat: the reference."""

    def on_stream_start(self) -> None:
        self.active.add(1)

    def on_stream_refused(self, reason: str) -> None:
        self.refused.add(1, {"reason": reason})

    def on_call_end(self, call: Any) -> None:
        self.active.add(-1)

    def record_measurements(self, m: Measurements) -> None:
        llm, model, request_model, response_model, operation, err, status, outcome, *values = m.labels
        custom = dict(zip(self.measurer.names, values))
        ai = {"llm": llm, "model": model, **custom}
        genai = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": llm,
            "gen_ai.request.model": request_model,
            "gen_ai.response.model": response_model,
            **custom,
        }
        timed = {**genai, "error.type": err} if err else genai
        if m.duration is not None:
            self.duration.record(m.duration, timed)
        if m.ttft is not None:
            self.ttft.record(m.ttft, timed)
        if m.tokens[0] is not None:
            self.prompt_tokens.add(m.tokens[0], ai)
        if m.tokens[1] is not None:
            self.completion_tokens.add(m.tokens[1], ai)
        if m.tpot is not None:
            self.tpot.record(m.tpot, timed)
        for t, n in zip(TOKEN_TYPES, m.tokens):
            if n is not None:
                self.token_usage.record(n, {**genai, "gen_ai.token.type": t})
        if m.usage_missing:
            self.usage_missing.add(1, {**ai, "operation": operation})
        if m.cost_usd is not None:
            self.cost.add(m.cost_usd, ai)
        elif m.unpriced is not None:
            self.unpriced.add(1, {**ai, "reason": m.unpriced})
        if m.finish_reason is not None:
            self.finish_reasons.add(1, {**ai, "finish_reason": m.finish_reason})
        if m.parse_errors:
            self.parse_errors.add(m.parse_errors, {"llm": llm, "reason": m.parse_error_reason})
        self.processing.record(m.processing, {"llm": llm, "operation": operation})
        self.requests.add(1, {**ai, "operation": operation, "status_code": status, "outcome": outcome, "error_type": err})


class Bound(OtlpMetrics):
    def on_call_end(self, call: Any) -> None:
        self._active.add(-1)


def measurements(i: int) -> Measurements:
    """A varied call: several models, users (custom label), outcomes, errors, missing values."""
    model = ("gpt-4o", "claude-3", "gemini-2")[i % 3]
    ok = i % 5 != 4
    labels = (
        ("openai", "anthropic")[i % 2],
        model,
        model,
        model + "-v" if i % 4 else "",
        ("chat", "embeddings")[i % 7 == 0],
        "" if ok else "rate_limit",
        "200" if ok else "429",
        "ok" if ok else "error",
        f"user{i % 4}",
    )
    assert len(labels) == len(LABELS) + 1
    streaming = i % 2 == 0
    return Measurements(
        labels,
        duration=0.013 * (i + 1) if i % 9 else None,
        ttft=0.007 * i if streaming and ok else None,
        tpot=0.0011 * i if streaming and ok and i % 3 else None,
        tokens=(10 * i if ok else None, 3 * i + 1 if ok else None, i if i % 3 == 0 else None, None, (i * 7) % 5 or None),
        usage_missing=ok and i % 6 == 5,
        cost_usd=(0.1 + 0.01 * i) / 3 if ok and i % 8 else None,
        unpriced=None if ok and i % 8 else ("unknown_model", "no_usage")[i % 2],
        finish_reason=("stop", "length", None)[i % 3],
        parse_errors=i % 10 == 3,
        parse_error_reason=("json", "sse")[i % 2] if i % 10 == 3 else "",
        processing=0.00003 * (i % 11 + 1),
    )


def drive(o: OtlpMetrics, keep: Keep, rounds: list[range]) -> list[MetricsData]:
    for r in rounds:
        for i in r:
            o.on_stream_start()
            if i % 13 == 0:
                o.on_stream_refused(("max_streams", "overloaded")[i % 2])
            o.on_call_end(None)
            o.record_measurements(measurements(i))
        o.reader.collect()
    o.shutdown()
    return keep.exports[: len(rounds)]


def points(data: MetricsData) -> list[tuple]:
    """Every metric and point of an export, less the timestamps (and the per-process resource)."""
    out = []
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "process.cpu.time":  # the process's CPU time: read, not recorded
                    continue
                d = metric.data
                extra = {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if f.name != "data_points"}
                rows = []
                for p in d.data_points:
                    assert p.start_time_unix_nano > 0 and p.time_unix_nano > 0
                    row = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if "time_unix_nano" not in f.name}
                    row["attributes"] = dict(row["attributes"])
                    rows.append(row)
                out.append((sm.scope.name, metric.name, metric.unit, metric.description, type(d).__name__, extra, rows))
    return out


@pytest.mark.parametrize("temporality", [{}, DELTA], ids=["cumulative", "delta"])
@pytest.mark.parametrize("max_series", [2000, 3], ids=["roomy", "cardinality_limit"])
def test_exports_equal_the_sdk_api_point_by_point(temporality, max_series):
    stats = parse(
        {
            "stats": {
                "customLabels": [{"name": "end_user", "field": "end_user"}],
                "maxSeries": max_series,
                "otlp": {"enabled": True, "exportIntervalMs": 3_600_000},
            }
        }
    ).stats
    rounds = [range(0, 1), range(1, 40), range(40, 41), range(41, 90)]  # one attribute set, then many; twice
    plain_keep, bound_keep = Keep(temporality), Keep(temporality)
    want = drive(PlainApi(stats, plain_keep), plain_keep, rounds)
    got = drive(Bound(stats, bound_keep), bound_keep, rounds)
    assert len(want) == len(got) == len(rounds)
    names = {m[1] for m in points(want[1])}
    assert names >= {
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
        "ai.prompt_tokens",
        "ai.completion_tokens",
        "ai.requests",
        "ai.cost_usd",
        "ai.cost_unpriced",
        "ai.usage_missing",
        "ai.finish_reasons",
        "ai.parse_errors",
        "ai.active_streams",
        "ai.streams_refused",
        "extproc.processing.duration",
    }
    for w, g in zip(want, got):
        assert points(g) == points(w)
    kinds = {row["attributes"].get("otel.metric.overflow") for m in points(want[3]) for row in m[6]}
    assert (True in kinds) == (max_series == 3)  # the limit case does reach the SDK's overflow set
    temporalities = {m[5].get("aggregation_temporality") for m in points(want[3])} - {None}
    assert temporalities == {AggregationTemporality.DELTA if temporality else AggregationTemporality.CUMULATIVE}


def test_a_bound_value_is_not_lost_to_a_concurrent_delta_collection():
    """Delta: the collection thread swaps in new aggregations; a value recorded meanwhile lands
    in the collected dict or the new one, never in one already collected."""
    keep = Keep(DELTA)
    o = Bound(parse({"stats": {"otlp": {"enabled": True, "exportIntervalMs": 3_600_000}}}).stats, keep)
    bound = otel_compat.Bound(o.requests, {"llm": "x"})
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            o.reader.collect()

    t = threading.Thread(target=collect)
    t.start()
    n = 50_000
    for _ in range(n):
        bound.add(1)
    stop.set()
    t.join()
    o.reader.collect()
    total = sum(row["value"] for d in keep.exports for m in points(d) if m[1] == "ai.requests" for row in m[6])
    o.shutdown()
    assert total == n


def test_refused_values_are_dropped_as_the_sdk_drops_them():
    keep = Keep({})
    o = Bound(parse({"stats": {"otlp": {"enabled": True, "exportIntervalMs": 3_600_000}}}).stats, keep)
    counter, updown = otel_compat.Bound(o.requests, {"a": "b"}), otel_compat.Bound(o.active, None)
    for v in (-1, float("nan"), float("inf"), 2):
        counter.add(v)
    for v in (-3, float("nan"), float("-inf")):
        updown.add(v)
    o.reader.collect()
    o.shutdown()
    got = {m[1]: [r["value"] for r in m[6]] for m in points(keep.exports[0])}
    assert got["ai.requests"] == [2] and got["ai.active_streams"] == [-3]


def test_the_sdk_internals_relied_on_exist():
    """Each private name otel_compat uses, on the installed SDK (pinned in pyproject)."""
    o = Bound(parse({"stats": {"otlp": {"enabled": True, "exportIntervalMs": 3_600_000}}}).stats, Keep(DELTA))
    [match] = otel_compat.view_matches(o.requests)  # one reader, the default view
    assert match._reset_on_collect is True and match._view._attribute_keys is None
    assert isinstance(match._attributes_aggregation, dict) and hasattr(match._lock, "__enter__")
    agg = match._get_or_create_aggregation(otel_compat._hash_attributes({"k": "v"}), {"k": "v"})
    agg.aggregate(otel_compat._Value(5), False)  # reads nothing but the value when not sampling
    assert match._attributes_aggregation[otel_compat._hash_attributes({"k": "v"})] is agg
    assert o.provider._sdk_config.exemplar_filter is otel_compat.EXEMPLAR_FILTER
    assert o.requests._is_enabled() and o.token_usage._is_enabled()  # no meter configurator: Bound does not ask
    o.shutdown()
