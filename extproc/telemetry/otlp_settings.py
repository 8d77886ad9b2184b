"""Whether and where OTLP traces and metrics go: the ``tracing`` and ``stats.otlp`` config, then
the standard ``OTEL_*`` variables. One module, so both signals follow the same rules:

- config wins over the environment wherever both are set;
- for a signal, its own variable comes first (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), then the
  generic one (``OTEL_EXPORTER_OTLP_ENDPOINT``);
- over HTTP, a configured endpoint is a base URL: ``/v1/<signal>`` is appended unless already
  there; the variables are left to the OTel SDK, which follows the spec (the signal's own variable
  is used as-is, the generic one gets ``/v1/<signal>``);
- ``OTEL_SDK_DISABLED=true`` turns both signals off.

No OpenTelemetry import here: ``observers`` asks ``traces_enabled()`` / ``metrics_enabled()``
first, and a sidecar that exports neither never loads the OTel SDK.
"""

from __future__ import annotations

import os

from extproc.core.config import OtlpMetricsConfig, TracingConfig

__all__ = (
    "DEFAULT_INTERVAL_MS",
    "DEFAULT_TIMEOUT_MS",
    "GRPC",
    "HTTP",
    "http_metrics_url",
    "http_traces_url",
    "metrics_enabled",
    "metrics_endpoint",
    "metrics_interval_ms",
    "metrics_protocol",
    "metrics_timeout_ms",
    "traces_enabled",
    "traces_endpoint",
    "traces_protocol",
)
GRPC, HTTP = "grpc", "http"
DEFAULT_INTERVAL_MS = 60000  # the OTel SDK's default metric export interval
DEFAULT_TIMEOUT_MS = 10000


# --- shared rules -------------------------------------------------------------------------------


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _endpoint(signal: str, configured: str | None) -> str | None:
    env = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return configured or env or None


def _protocol(signal: str, configured: str | None) -> str:
    if configured:
        return configured
    env = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or GRPC
    return HTTP if env.startswith("http") else GRPC


def _http_url(base: str, signal: str) -> str:
    base, suffix = base.rstrip("/"), f"/v1/{signal.lower()}"
    return base if base.endswith(suffix) else base + suffix


def _env_ms(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


# --- traces (``tracing``) -----------------------------------------------------------------------


def traces_endpoint(cfg: TracingConfig) -> str | None:
    """The collector, or None (tracing off): config first, then the OTEL_* variables."""
    return _endpoint("TRACES", cfg.otlp_endpoint)


def traces_enabled(cfg: TracingConfig) -> bool:
    """Tracing is on when a collector is known (config or environment); never with OTEL_SDK_DISABLED=true."""
    return traces_endpoint(cfg) is not None and not _sdk_disabled()


def traces_protocol(cfg: TracingConfig) -> str:
    return _protocol("TRACES", cfg.otlp_protocol)


def http_traces_url(base: str) -> str:
    """A base URL gets ``/v1/traces`` appended."""
    return _http_url(base, "TRACES")


# --- metrics (``stats.otlp``) -------------------------------------------------------------------


def metrics_enabled(cfg: OtlpMetricsConfig) -> bool:
    """``stats.otlp.enabled``, else ``OTEL_METRICS_EXPORTER`` lists ``otlp``; never with OTEL_SDK_DISABLED=true."""
    if _sdk_disabled():
        return False
    if cfg.enabled is not None:
        return cfg.enabled
    exporters = os.environ.get("OTEL_METRICS_EXPORTER", "")
    return "otlp" in (e.strip().lower() for e in exporters.split(","))


def metrics_endpoint(cfg: OtlpMetricsConfig) -> str | None:
    """The collector: config, else OTEL_EXPORTER_OTLP_METRICS_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT,
    else None (the exporter's default, localhost:4317 or http://localhost:4318/v1/metrics)."""
    return _endpoint("METRICS", cfg.endpoint)


def metrics_protocol(cfg: OtlpMetricsConfig) -> str:
    return _protocol("METRICS", cfg.protocol)


def http_metrics_url(base: str) -> str:
    """A base URL gets ``/v1/metrics`` appended."""
    return _http_url(base, "METRICS")


def metrics_interval_ms(cfg: OtlpMetricsConfig) -> int:
    return cfg.export_interval_ms or _env_ms("OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_INTERVAL_MS)


def metrics_timeout_ms(cfg: OtlpMetricsConfig) -> int:
    return cfg.export_timeout_ms or _env_ms("OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_TIMEOUT_MS)
