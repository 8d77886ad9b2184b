"""Metrics over OTLP: the same calls and values as the Prometheus instruments, under
OpenTelemetry names; loaded only when enabled; a failing export is counted, never raised."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter, MetricExportResult
from prometheus_client import CollectorRegistry

from extproc.core import config
from extproc.telemetry import otlp_settings
from extproc.telemetry.metrics import MetricsObserver
from extproc.telemetry.otlp_metrics import POINTS_DROPPED, OtlpMetrics
from tests.support.otlp_receiver import MetricStore
from tests.unit.test_finish_reason import LENGTH_STOPS, through


class StoreExporter(MetricExporter):
    """Encodes each export as the OTLP exporters do, into a receiver's store."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self.store = MetricStore()
        self.fail = fail

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
        if self.fail:
            raise ConnectionError("collector down")
        self.store.add(encode_metrics(metrics_data).SerializeToString())
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        pass


STATS = {
    "customLabels": [{"name": "end_user", "field": "end_user"}],
    "maxLabelValues": 2,
    "otlp": {"enabled": True, "exportIntervalMs": 60000},
}


def calls():
    out = []
    for i, api in enumerate(["openai", "anthropic", "gemini", "bedrock", "openai", "openai"]):
        path, req, resp, _ = LENGTH_STOPS[api]
        if api == "openai":
            req = req.replace(b'"messages"', b'"user":"u-%d","messages"' % i)
        out.append(through(path, req, resp)[0])
    return out


def test_same_values_as_prometheus_under_otel_names():
    stats = config.StatsConfig.model_validate(STATS)
    exporter = StoreExporter()
    otlp = OtlpMetrics(stats, exporter)
    registry = CollectorRegistry()
    prom = MetricsObserver(stats, registry)
    try:
        for call in calls():
            otlp.record(call)
            prom.record(call)
        assert otlp.force_flush()
    finally:
        otlp.shutdown()
    store = exporter.store
    assert len(store.instances("ai.prompt_tokens")) == 1
    for otel, prom_name in (
        ("ai.prompt_tokens", "ai_prompt_tokens_total"),
        ("ai.completion_tokens", "ai_completion_tokens_total"),
        ("ai.requests", "ai_requests_total"),
        ("ai.finish_reasons", "ai_finish_reasons_total"),
    ):
        for user in ("u-0", "u-4", "__overflow__", ""):
            want = sum(s.value for m in registry.collect() for s in m.samples if s.name == prom_name and s.labels.get("end_user") == user)
            assert store.total(otel, end_user=user) == want, (otel, user)
    assert store.total("ai.finish_reasons", finish_reason="length") == 6
    for token_type in ("input", "output"):
        want = sum(
            s.value
            for m in registry.collect()
            for s in m.samples
            if s.name == "gen_ai_client_token_usage_sum" and s.labels["gen_ai_token_type"] == token_type
        )
        assert (
            store.total("gen_ai.client.token.usage", "sum", **{"gen_ai.token.type": token_type})
            == want
            == (24 if token_type == "input" else 18)
        )
    assert store.total("gen_ai.client.operation.duration", "count") == 6
    attrs = store.attribute_sets("gen_ai.client.token.usage")[0]
    assert {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.token.type", "end_user"} <= set(attrs)


def test_a_failing_export_is_counted_not_raised():
    stats = config.StatsConfig.model_validate(STATS)
    otlp = OtlpMetrics(stats, StoreExporter(fail=True))
    before = POINTS_DROPPED._value.get()
    try:
        for call in calls():
            otlp.on_call_end(call)
        otlp.force_flush()
    finally:
        otlp.shutdown()
    assert otlp.exporter.failed_exports >= 1
    assert POINTS_DROPPED._value.get() > before


@pytest.mark.parametrize(
    "env, cfg, want",
    [
        ({}, {}, False),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, {}, True),
        ({"OTEL_METRICS_EXPORTER": "prometheus, otlp"}, {}, True),
        ({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, {}, False),
        ({"OTEL_METRICS_EXPORTER": "none"}, {"enabled": True}, True),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, {"enabled": False}, False),
    ],
)
def test_enabled(monkeypatch, env, cfg, want):
    for k in ("OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert otlp_settings.metrics_enabled(config.OtlpMetricsConfig.model_validate(cfg)) is want


def test_settings_fall_back_to_the_otel_variables(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "1500")
    cfg = config.OtlpMetricsConfig()
    assert (otlp_settings.metrics_endpoint(cfg), otlp_settings.metrics_protocol(cfg), otlp_settings.metrics_interval_ms(cfg)) == (
        "http://collector:4318",
        "http",
        1500,
    )
    cfg = config.OtlpMetricsConfig.model_validate({"endpoint": "127.0.0.1:4317", "protocol": "grpc", "exportIntervalMs": 200})
    assert (otlp_settings.metrics_endpoint(cfg), otlp_settings.metrics_protocol(cfg), otlp_settings.metrics_interval_ms(cfg)) == (
        "127.0.0.1:4317",
        "grpc",
        200,
    )
    assert otlp_settings.http_metrics_url("http://c:4318/") == "http://c:4318/v1/metrics"


def _observers_in_subprocess(env: str) -> list[str]:
    code = (
        "import os, sys; [os.environ.pop(k) for k in list(os.environ) if k.startswith('OTEL_')];"
        + env
        + "from extproc.core import config; from extproc.telemetry import observers as app;"
        "obs = app.observers(config.parse({})); print(sorted(type(o).__name__ for o in obs),"
        " 'opentelemetry.sdk.metrics' in sys.modules); [getattr(o, 'shutdown', lambda: 0)() for o in obs]"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("]")


def test_the_default_path_does_not_load_the_otel_metrics_sdk():
    names, loaded = _observers_in_subprocess("")
    assert "OtlpMetrics" not in names and loaded.strip() == "False"
    names, loaded = _observers_in_subprocess(
        "os.environ['OTEL_METRICS_EXPORTER'] = 'otlp'; os.environ['OTEL_METRIC_EXPORT_INTERVAL'] = '60000';"
    )
    assert "OtlpMetrics" in names and loaded.strip() == "True"


def test_delta_temporality_preference_is_the_exporters(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    from extproc.telemetry.otlp_metrics import build_exporter

    exporter = build_exporter(config.StatsConfig.model_validate({"otlp": {"enabled": True, "endpoint": "127.0.0.1:1"}}))
    from opentelemetry.sdk.metrics import Counter

    assert exporter._preferred_temporality[Counter] == AggregationTemporality.DELTA
    exporter.shutdown()


class CostlyExporter(StoreExporter):
    """An export that burns ``cpu_s`` of this thread's CPU (a large encode), counting exports and
    noting when each started and whether ``stopping()`` was true then."""

    def __init__(self, cpu_s: float) -> None:
        super().__init__()
        self.cpu_s = cpu_s
        self.exports = 0
        self.stopping: Callable[[], bool] = lambda: False
        self.started: list[tuple[float, bool]] = []

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
        import time

        self.exports += 1
        self.started.append((time.monotonic(), self.stopping()))
        end = time.thread_time() + self.cpu_s
        while time.thread_time() < end:
            pass
        return MetricExportResult.SUCCESS


def test_exports_are_paced_to_a_small_share_of_the_cpu_whatever_the_interval():
    """Exports costing 40 ms of CPU, asked for every 50 ms: the next waits ~19 x its cost, so in
    2 s there are at most 3 (the SDK's own reader ran ~22, holding the worker ~45% of the time),
    and the last interval's data is exported at shutdown."""
    import time

    stats = config.StatsConfig.model_validate({"otlp": {"enabled": True, "exportIntervalMs": 50}})
    exporter = CostlyExporter(0.04)
    t0 = time.monotonic()  # the export thread starts after this
    otlp = OtlpMetrics(stats, exporter)
    exporter.stopping = otlp.pacer._stop.is_set
    try:
        for call in calls():
            otlp.on_call_end(call)
        time.sleep(2.0)
    finally:
        otlp.shutdown()
    # Read from the exports' own start times and the stop flag, not from a count taken just
    # before shutdown: an export may begin between that count and the stop on a loaded machine.
    periodic = [t - t0 for t, stopping in exporter.started if not stopping]
    assert 1 <= len([t for t in periodic if t < 2.0]) <= 3, periodic
    assert len(exporter.started) == len(periodic) + 1  # one last export at shutdown


def test_the_series_budget_is_divided_among_the_workers():
    from extproc.telemetry import labels
    from extproc.telemetry.mcp import McpMetrics

    stats = config.StatsConfig.model_validate({"maxSeries": 2000, "otlp": {"enabled": True, "exportIntervalMs": 60000}})
    labels.share_among(4)
    try:
        prom = MetricsObserver(stats, CollectorRegistry())
        mcp = McpMetrics(stats)
        otlp = OtlpMetrics(stats, StoreExporter())
        otlp.shutdown()
    finally:
        labels.share_among(1)
    assert prom.budget.limit == mcp.budget.limit == 500
    limits = {k.__name__: v for k, v in otlp.reader._instrument_class_cardinality_limit.items()}  # the SDK's cap
    assert limits["_Counter"] == limits["_Histogram"] == limits["_UpDownCounter"] == 500
    assert MetricsObserver(stats, CollectorRegistry()).budget.limit == 2000  # one worker: the whole budget
