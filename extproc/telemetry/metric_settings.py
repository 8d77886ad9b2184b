"""Whether and where metrics are pushed over OTLP, from ``stats.otlp`` and the standard OTEL_*
variables (config wins where both are set).

No OpenTelemetry import here: ``observers`` asks ``enabled()`` first, and a sidecar that does not
push metrics never loads the OTel metrics SDK.
"""
from __future__ import annotations

import os

from extproc.core.config import OtlpMetricsConfig
from extproc.telemetry import otlp_env
from extproc.telemetry.otlp_env import GRPC, HTTP

__all__ = ("DEFAULT_INTERVAL_MS", "DEFAULT_TIMEOUT_MS", "GRPC", "HTTP", "enabled", "endpoint", "http_metrics_url", "interval_ms",
           "protocol", "timeout_ms")
DEFAULT_INTERVAL_MS = 60000  # the OTel SDK's default export interval
DEFAULT_TIMEOUT_MS = 10000


def enabled(cfg: OtlpMetricsConfig) -> bool:
    """``stats.otlp.enabled``, else ``OTEL_METRICS_EXPORTER`` lists ``otlp``; never with OTEL_SDK_DISABLED=true."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if cfg.enabled is not None:
        return cfg.enabled
    exporters = os.environ.get("OTEL_METRICS_EXPORTER", "")
    return "otlp" in (e.strip().lower() for e in exporters.split(","))


def endpoint(cfg: OtlpMetricsConfig) -> str | None:
    """The collector: config, else OTEL_EXPORTER_OTLP_METRICS_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT,
    else None (the exporter's default, localhost:4317 or http://localhost:4318/v1/metrics)."""
    return otlp_env.endpoint("METRICS", cfg.endpoint)


def protocol(cfg: OtlpMetricsConfig) -> str:
    return otlp_env.protocol("METRICS", cfg.protocol)


def http_metrics_url(base: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` semantics: a base URL gets ``/v1/metrics`` appended."""
    return otlp_env.http_url(base, "METRICS")


def _env_ms(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def interval_ms(cfg: OtlpMetricsConfig) -> int:
    return cfg.export_interval_ms or _env_ms("OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_INTERVAL_MS)


def timeout_ms(cfg: OtlpMetricsConfig) -> int:
    return cfg.export_timeout_ms or _env_ms("OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_TIMEOUT_MS)
