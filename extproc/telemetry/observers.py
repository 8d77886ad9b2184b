"""Wires the observers (metrics, tracing, logs) a worker reports finished calls to."""

from __future__ import annotations

import logging

from extproc.core.bounded import clip, clip_opt
from extproc.core.call import Call, CallObserver
from extproc.core.config import Config
from extproc.telemetry import otlp_settings
from extproc.telemetry.mcp import McpMetrics

log = logging.getLogger("extproc.calls")


class CallLog:
    """A debug-level line per call (no headers, no bodies: nothing secret can leak here)."""

    def on_call_end(self, call: Call) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        obs = call.obs
        log.debug(
            "call",
            extra={
                "provider": clip(call.provider),
                "api": call.api,
                "status": call.status,
                "outcome": call.outcome,
                "model": clip_opt(obs.request_model),
                "provider_model": clip_opt(obs.response_model),
                "streaming": obs.streaming,
                "input_tokens": obs.usage.input_tokens,
                "output_tokens": obs.usage.output_tokens,
                "parse_errors": obs.parse_errors,
                "parse_error": obs.parse_error_reason,
            },
        )


def observers(config: Config) -> list[CallObserver]:
    """The observers for ``config``. If one cannot be built, those already built are shut down
    (a tracer's export thread must not outlive a rejected reload) and the error is raised."""
    out: list[CallObserver] = [CallLog()]
    try:
        otlp = None
        if otlp_settings.metrics_enabled(config.stats.otlp):
            from extproc.telemetry import otlp_metrics  # the OTel metrics SDK loads only when OTLP metrics are on

            otlp = otlp_metrics.observer(config.stats)
        if config.stats.port:  # 0: no endpoint, so nothing to record
            from extproc.telemetry import prometheus_store
            from extproc.telemetry.metrics import MetricsObserver, process_registry

            prometheus_store.register_counter(process_registry())  # multiprocess mode: counts what cannot be stored
            # With OTLP on too, both backends record one measurement per call (one Measurer).
            ai = MetricsObserver(config.stats, process_registry(), otlp.measurer if otlp else None)
            out += [McpMetrics(config.stats, ai.metrics), ai]
        if otlp is not None:
            out.append(otlp)
        if otlp_settings.traces_enabled(config.tracing):
            from extproc.telemetry.tracing import Tracer  # the OTel SDK loads only when tracing is on

            out.append(Tracer(config.tracing))
    except BaseException:
        for o in out:
            shutdown = getattr(o, "shutdown", None)
            # the OTLP metrics pipeline is the worker's, shared with the running observers: kept
            if shutdown is not None and not getattr(o, "shared", False):
                shutdown()
        raise
    return out
