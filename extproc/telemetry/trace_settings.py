"""Where spans go, decided from ``tracing`` config and the standard OTEL_* variables.

No OpenTelemetry import here: ``app`` asks ``enabled()`` first, and a sidecar without tracing
never loads the SDK. Config wins over the environment wherever both are set.
"""
from __future__ import annotations

import os

from extproc.core.config import TracingConfig
from extproc.telemetry import otlp_env
from extproc.telemetry.otlp_env import GRPC, HTTP

__all__ = ("GRPC", "HTTP", "enabled", "endpoint", "http_traces_url", "protocol")


def endpoint(cfg: TracingConfig) -> str | None:
    """The collector, or None (tracing off): config first, then the OTEL_* variables."""
    return otlp_env.endpoint("TRACES", cfg.otlp_endpoint)


def enabled(cfg: TracingConfig) -> bool:
    return endpoint(cfg) is not None and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"


def protocol(cfg: TracingConfig) -> str:
    return otlp_env.protocol("TRACES", cfg.otlp_protocol)


def http_traces_url(base: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` semantics: a base URL gets ``/v1/traces`` appended."""
    return otlp_env.http_url(base, "TRACES")
