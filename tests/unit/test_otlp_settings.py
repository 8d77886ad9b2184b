"""Traces and metrics read the OTLP settings by the same rules: config over environment, the
signal's own variable over the generic one, ``/v1/<signal>`` appended to an HTTP base URL (a
configured endpoint, the generic variable) but not to the signal's own variable, and
OTEL_SDK_DISABLED=true turning both off."""

from __future__ import annotations

import pytest

from extproc.core import config
from extproc.telemetry import otlp_settings

_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_SDK_DISABLED",
    "OTEL_METRICS_EXPORTER",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in _VARS:
        monkeypatch.delenv(k, raising=False)


def test_a_signals_own_variable_wins_over_the_generic_one(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    assert otlp_settings.traces_endpoint(config.TracingConfig()) == "http://traces:4318"
    assert otlp_settings.traces_protocol(config.TracingConfig()) == otlp_settings.HTTP
    assert otlp_settings.metrics_endpoint(config.OtlpMetricsConfig()) == "http://generic:4318"
    assert otlp_settings.metrics_protocol(config.OtlpMetricsConfig()) == otlp_settings.GRPC


def test_config_wins_over_the_environment_for_both_signals(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    tracing = config.TracingConfig.model_validate({"otlpEndpoint": "127.0.0.1:4317", "otlpProtocol": "grpc"})
    metrics = config.OtlpMetricsConfig.model_validate({"endpoint": "127.0.0.1:4317", "protocol": "grpc"})
    assert (otlp_settings.traces_endpoint(tracing), otlp_settings.traces_protocol(tracing)) == ("127.0.0.1:4317", "grpc")
    assert (otlp_settings.metrics_endpoint(metrics), otlp_settings.metrics_protocol(metrics)) == ("127.0.0.1:4317", "grpc")


def test_tracing_is_on_with_a_collector_and_off_when_the_sdk_is_disabled(monkeypatch):
    assert not otlp_settings.traces_enabled(config.TracingConfig())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    assert otlp_settings.traces_enabled(config.TracingConfig())
    assert otlp_settings.metrics_enabled(config.OtlpMetricsConfig())
    monkeypatch.setenv("OTEL_SDK_DISABLED", " TRUE ")
    assert not otlp_settings.traces_enabled(config.TracingConfig())
    assert not otlp_settings.metrics_enabled(config.OtlpMetricsConfig())


@pytest.mark.parametrize(
    "base, traces, metrics",
    [
        ("http://c:4318", "http://c:4318/v1/traces", "http://c:4318/v1/metrics"),
        ("http://c:4318/", "http://c:4318/v1/traces", "http://c:4318/v1/metrics"),
    ],
)
def test_an_http_base_url_gets_the_signal_path(base, traces, metrics):
    assert otlp_settings.http_traces_url(base) == traces
    assert otlp_settings.http_metrics_url(base) == metrics


def test_a_full_signal_url_is_kept():
    assert otlp_settings.http_traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


@pytest.mark.parametrize(
    "env, traces, metrics",
    [
        # the signal's own variable is the full URL, used as-is (OpenTelemetry spec, OTLP exporter)
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom/t",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/custom/m",
            },
            "http://c:4318/custom/t",
            "http://c:4318/custom/m",
        ),
        # the generic variable is a base URL: the signal's path is appended
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://g:4318/base"}, "http://g:4318/base/v1/traces", "http://g:4318/base/v1/metrics"),
    ],
)
def test_http_endpoint_variables_follow_the_spec(monkeypatch, env, traces, metrics):
    from extproc.telemetry import otlp_metrics, trace_export

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = config.parse({})
    assert trace_export.build_exporter(cfg.tracing)._endpoint == traces
    assert otlp_metrics.build_exporter(cfg.stats)._endpoint == metrics
