"""The one measurement step: a finished call is measured once, and the Prometheus and OTLP backends
record exactly what it measured; a label added in one function reaches both."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from extproc.core import config
from extproc.core.call import OK, Call
from extproc.telemetry import measurements, observers
from extproc.telemetry.measurements import Measurer
from extproc.telemetry.metrics import MetricsObserver
from extproc.telemetry.otlp_metrics import OtlpMetrics
from tests.unit.test_otlp_metrics import STATS, StoreExporter, calls


class ApiLabel:
    """A label source every call metric should carry once it is listed in label_sources."""

    name = "api"

    def value(self, call: Call) -> str:
        return call.api


def _backends(stats: config.StatsConfig) -> tuple[OtlpMetrics, StoreExporter, MetricsObserver, CollectorRegistry]:
    exporter = StoreExporter()
    otlp = OtlpMetrics(stats, exporter)
    registry = CollectorRegistry()
    return otlp, exporter, MetricsObserver(stats, registry, otlp.measurer), registry


def test_a_label_added_in_label_sources_reaches_both_backends(monkeypatch):
    plain = measurements.label_sources
    monkeypatch.setattr(measurements, "label_sources", lambda stats: (*plain(stats), ApiLabel()))
    otlp, exporter, prom, registry = _backends(config.StatsConfig.model_validate({**STATS, "maxLabelValues": 100}))
    try:
        for call in calls():
            prom.on_call_end(call)
            otlp.on_call_end(call)
        assert otlp.force_flush()
    finally:
        otlp.shutdown()
    assert prom.failures == otlp.failures == 0
    apis = {c.api for c in calls()}
    for prom_name, otel in (
        ("ai_requests_total", "ai.requests"),
        ("ai_prompt_tokens_total", "ai.prompt_tokens"),
        ("gen_ai_client_operation_duration_seconds_count", "gen_ai.client.operation.duration"),
        ("gen_ai_client_token_usage_count", "gen_ai.client.token.usage"),
        ("ai_finish_reasons_total", "ai.finish_reasons"),
    ):
        seen = {s.labels.get("api") for m in registry.collect() for s in m.samples if s.name == prom_name}
        assert seen == apis, prom_name
        assert {a.get("api") for a in exporter.store.attribute_sets(otel)} == apis, otel
        for api in apis:
            field = "count" if "duration" in otel or "token.usage" in otel else "value"
            want = sum(s.value for m in registry.collect() for s in m.samples if s.name == prom_name and s.labels["api"] == api)
            assert exporter.store.total(otel, field, api=api) == want > 0, (otel, api)


def test_a_call_is_measured_once_for_both_backends(monkeypatch):
    measured: list[Call] = []
    inner = Measurer._measure

    def counting(self: Measurer, call: Call) -> measurements.Measurements:
        measured.append(call)
        return inner(self, call)

    monkeypatch.setattr(Measurer, "_measure", counting)
    otlp, _, prom, _ = _backends(config.StatsConfig.model_validate(STATS))
    try:
        batch = calls()
        for call in batch:
            prom.on_call_end(call)
            otlp.on_call_end(call)
    finally:
        otlp.shutdown()
    assert measured == batch


def test_observers_share_one_measurer_between_prometheus_and_otlp(monkeypatch):
    built: list[OtlpMetrics] = []

    def observer(stats: config.StatsConfig) -> OtlpMetrics:
        built.append(OtlpMetrics(stats, StoreExporter()))
        return built[0]

    monkeypatch.setattr("extproc.telemetry.otlp_metrics.observer", observer)
    out = observers.observers(config.parse({"stats": {"otlp": {"enabled": True}}}))
    try:
        prom = next(o for o in out if isinstance(o, MetricsObserver))
        assert built and prom.measurer is built[0].measurer
    finally:
        built[0].shutdown()


def test_a_negative_token_count_is_recorded_by_neither_backend():
    otlp, exporter, prom, registry = _backends(config.StatsConfig.model_validate(STATS))
    call = calls()[0]
    call.obs.usage.output_tokens = -3
    try:
        with pytest.raises(ValueError, match="negative token count"):
            prom.measurer.measure(call)
        prom.on_call_end(call)
        otlp.on_call_end(call)
        otlp.force_flush()
    finally:
        otlp.shutdown()
    assert (prom.failures, otlp.failures) == (1, 1)
    assert registry.get_sample_value("ai_requests_total", {}) is None
    assert not [s for m in registry.collect() for s in m.samples if s.name == "ai_requests_total"]
    assert exporter.store.total("ai.requests") == 0


@pytest.mark.parametrize(
    "streaming, status, outcome, ttft, tpot",
    [
        (True, 200, OK, 0.5, (2.0 - 0.5) / (4 - 1)),
        (True, 200, "client_abort", 0.5, None),  # TPOT needs a complete response
        (True, 429, "error", None, None),  # no first token of an error
        (False, 200, OK, None, None),  # TTFT and TPOT are for streams
    ],
)
def test_ttft_and_tpot_rules(streaming, status, outcome, ttft, tpot):
    call = Call(provider="openai", api="openai.chat", status=status, outcome=outcome, start=0.0, first_chunk=0.5, end=2.0)
    call.obs.streaming = streaming
    call.obs.usage.output_tokens = 4
    m = Measurer(config.StatsConfig()).measure(call)
    assert m is not None
    assert (m.duration, m.ttft, m.tpot) == (2.0, ttft, tpot)
    assert m.usage_missing is False and m.tokens == (None, 4, None, None, None)


def test_a_path_no_api_matched_is_not_measured():
    assert Measurer(config.StatsConfig()).measure(Call()) is None
