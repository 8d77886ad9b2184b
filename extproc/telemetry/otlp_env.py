"""The standard OTEL_EXPORTER_OTLP_* variables, per signal (``TRACES``, ``METRICS``): the
signal's own variable first, then the generic one. Config wins over them wherever both are set
(the callers: :mod:`trace_settings`, :mod:`metric_settings`)."""
from __future__ import annotations

import os

GRPC, HTTP = "grpc", "http"


def endpoint(signal: str, configured: str | None) -> str | None:
    env = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return configured or env or None


def protocol(signal: str, configured: str | None) -> str:
    if configured:
        return configured
    env = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or GRPC
    return HTTP if env.startswith("http") else GRPC


def http_url(base: str, signal: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` semantics: a base URL gets ``/v1/<signal>`` appended."""
    base, suffix = base.rstrip("/"), f"/v1/{signal.lower()}"
    return base if base.endswith(suffix) else base + suffix
