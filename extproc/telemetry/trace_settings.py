"""Where spans go, decided from ``tracing`` config and the standard OTEL_* variables.

No OpenTelemetry import here: ``app`` asks ``enabled()`` first, and a sidecar without tracing
never loads the SDK. Config wins over the environment wherever both are set.
"""
from __future__ import annotations

import os

from extproc.core.config import TracingConfig

GRPC, HTTP = "grpc", "http"


def endpoint(cfg: TracingConfig) -> str | None:
    """The collector, or None (tracing off): config first, then the OTEL_* variables."""
    env = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return cfg.otlp_endpoint or env or None


def enabled(cfg: TracingConfig) -> bool:
    return endpoint(cfg) is not None and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"


def protocol(cfg: TracingConfig) -> str:
    if cfg.otlp_protocol:
        return cfg.otlp_protocol
    env = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or GRPC
    return HTTP if env.startswith("http") else GRPC


def http_traces_url(base: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` semantics: a base URL gets ``/v1/traces`` appended."""
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"
