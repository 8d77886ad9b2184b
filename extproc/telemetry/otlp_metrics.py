"""The AI metrics pushed over OTLP with the OpenTelemetry SDK (``stats.otlp`` /
``OTEL_METRICS_EXPORTER=otlp``), besides or instead of the Prometheus endpoint.

The same calls and values as :mod:`extproc.telemetry.metrics`, under OpenTelemetry names:

- ``gen_ai.client.token.usage`` ({token}), ``gen_ai.client.operation.duration`` (s),
  ``gen_ai.server.time_to_first_token`` (s), ``gen_ai.server.time_per_output_token`` (s):
  histograms with the GenAI attributes (``gen_ai.operation.name``, ``gen_ai.provider.name``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.token.type``, ``error.type`` on
  failures) and the custom labels; the Prometheus buckets as explicit bucket boundaries.
- ``ai.prompt_tokens``, ``ai.completion_tokens`` ({token}), ``ai.requests`` ({request}),
  ``ai.cost_usd`` ({USD}), ``ai.cost_unpriced``, ``ai.usage_missing``, ``ai.finish_reasons``,
  ``ai.parse_errors`` ({call}): counters with the Prometheus labels as attributes; a
  collector's Prometheus exporter turns them back into ``ai_prompt_tokens_total`` etc.
- ``ai.active_streams``: up-down counter.

One MeterProvider per worker process, its resource carrying a ``service.instance.id`` of its own
(a collector sums the workers). Recording is an in-memory aggregation; a daemon thread exports
every ``exportIntervalMs``, each export bounded by ``exportTimeoutMs``, so a slow or dead
collector never delays a call. Data points of a failed export are counted in
``ai_otlp_metric_points_dropped_total`` (with the default cumulative temporality the next
successful export carries the totals again). Label values are capped like Prometheus' (per label
``stats.maxLabelValues``, then ``__overflow__``), and each instrument keeps at most
``stats.maxSeries`` attribute sets (the SDK's cardinality limit; beyond it, its overflow set).
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import Counter as PromCounter

from extproc.apis.finish import finish_reason
from extproc.core.bounded import clip
from extproc.core.call import OK, Call
from extproc.core.config import StatsConfig
from extproc.core.pricing import Cost
from extproc.telemetry import otlp_settings
from extproc.telemetry.labels import LabelGuard, LabelSource
from extproc.telemetry.metrics import DURATION_BUCKETS, TOKEN_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, error_type

log = logging.getLogger("extproc.telemetry.metrics")

DEFAULT_SERVICE_NAME = "envoy-ai-extproc"

POINTS_DROPPED = PromCounter(
    "ai_otlp_metric_points_dropped",
    "Metric data points an OTLP export did not deliver (the collector refused them or could not be reached in time)",
)


class CountingExporter(MetricExporter):
    """Delegates to the OTLP exporter; a failed (or raising) export is counted, never raised."""

    def __init__(self, inner: MetricExporter) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality, preferred_aggregation=inner._preferred_aggregation)
        self.inner = inner
        self.failed_exports = 0

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:  # an exporter bug must not kill the export thread
            log.exception("OTLP metric export raised")
            result = MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self.failed_exports += 1
            POINTS_DROPPED.inc(_points(metrics_data))
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _points(data: MetricsData) -> int:
    return sum(len(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics)


def build_exporter(stats: StatsConfig) -> MetricExporter:
    cfg = stats.otlp
    timeout = otlp_settings.metrics_timeout_ms(cfg) / 1000
    headers = dict(cfg.headers) or None  # None: the exporter reads OTEL_EXPORTER_OTLP_[METRICS_]HEADERS
    if otlp_settings.metrics_protocol(cfg) == otlp_settings.HTTP:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        url = otlp_settings.http_metrics_url(cfg.endpoint) if cfg.endpoint else None
        return HttpExporter(endpoint=url, headers=headers, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

    ep = cfg.endpoint
    insecure = True if ep and "://" not in ep else None  # a bare host:port is a plaintext collector
    return GrpcExporter(endpoint=ep, headers=headers, timeout=timeout, insecure=insecure)


def resource(instance_id: str) -> Resource:
    res = Resource.create({"service.instance.id": instance_id, "process.pid": os.getpid()})  # + OTEL_RESOURCE_ATTRIBUTES
    if str(res.attributes.get("service.name", "")).startswith("unknown_service"):
        res = res.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return res


class OtlpMetrics:
    """The call observer recording each finished LLM call into OTel instruments. Never raises."""

    shared = True  # one per worker, reused by every observer list built there (see observer())

    def __init__(self, stats: StatsConfig, exporter: MetricExporter | None = None) -> None:
        self.stats = stats
        self.instance_id = str(uuid.uuid4())
        self.exporter = CountingExporter(exporter or build_exporter(stats))
        limit = stats.max_series
        self.reader = PeriodicExportingMetricReader(
            self.exporter, export_interval_millis=otlp_settings.metrics_interval_ms(stats.otlp),
            export_timeout_millis=otlp_settings.metrics_timeout_ms(stats.otlp),
            cardinality_limits={k: limit for k in (Counter, UpDownCounter, Histogram, ObservableCounter,
                                                   ObservableUpDownCounter, ObservableGauge)},
        )
        self.provider = MeterProvider(resource=resource(self.instance_id), metric_readers=[self.reader], shutdown_on_exit=False)
        meter = self.provider.get_meter("envoy-ai-extproc")
        self.sources = tuple(LabelSource(c) for c in stats.custom_labels)
        self.guard = LabelGuard(stats.max_label_values)
        self.failures = 0
        self.closed = False
        hist = meter.create_histogram
        count = meter.create_counter
        self.token_usage = hist("gen_ai.client.token.usage", "{token}", "Tokens used per call",
                                explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.duration = hist("gen_ai.client.operation.duration", "s", "Call duration, first request byte to end of response",
                             explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.ttft = hist("gen_ai.server.time_to_first_token", "s", "Streams: request start to first response chunk",
                         explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
        self.tpot = hist("gen_ai.server.time_per_output_token", "s",
                         "Streams: (response complete - first chunk) / (output tokens - 1)", explicit_bucket_boundaries_advisory=TPOT_BUCKETS)
        self.prompt_tokens = count("ai.prompt_tokens", "{token}", "Prompt (input) tokens the provider reported")
        self.completion_tokens = count("ai.completion_tokens", "{token}", "Completion (output) tokens the provider reported")
        self.requests = count("ai.requests", "{request}", "LLM calls by outcome (ok, error, client_abort, no_response)")
        self.cost = count("ai.cost_usd", "{USD}", "Cost of LLM calls in US dollars, from the reported usage")
        self.unpriced = count("ai.cost_unpriced", "{call}", "LLM calls that could not be priced, by reason")
        self.usage_missing = count("ai.usage_missing", "{call}", "Successful LLM responses that reported no token usage")
        self.finish_reasons = count("ai.finish_reasons", "{call}", "LLM responses by how they ended")
        self.parse_errors = count("ai.parse_errors", "{payload}", "Payloads the sidecar could not parse")
        self.active = meter.create_up_down_counter("ai.active_streams", "{stream}", "ext_proc streams (HTTP exchanges) in flight")
        self.refused = count("ai.streams_refused", "{stream}", "ext_proc streams refused as they opened, unobserved")

    def on_stream_start(self) -> None:
        self.active.add(1)

    def on_stream_refused(self, reason: str) -> None:
        self.refused.add(1, {"reason": reason})

    def on_call_end(self, call: Call) -> None:
        try:
            self.active.add(-1)
            self.record(call)
        except Exception:  # a metrics bug must never reach the servicer
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.exception("recording OTLP metrics failed", extra={"failures": self.failures})

    def record(self, call: Call) -> None:
        if call.api == "unknown":
            return
        obs = call.obs
        fold = self.guard.fold
        provider = fold("llm", clip(call.provider))
        request_model = fold("model", clip(obs.request_model or ""))
        response_model = fold("response_model", clip(obs.response_model or ""))
        model = request_model or response_model or "unknown"
        err = fold("error_type", clip(error_type(call)))
        operation = fold("operation", clip(obs.operation))
        custom = {s.name: fold(s.name, s.value(call)) for s in self.sources}
        ai = {"llm": provider, "model": model, **custom}
        genai: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
                                 "gen_ai.request.model": request_model, "gen_ai.response.model": response_model, **custom}
        timed = {**genai, "error.type": err} if err else genai

        duration = call.duration
        if duration is not None:
            self.duration.record(duration, timed)
        ttft = call.ttft if obs.streaming and call.status < 400 else None
        if ttft is not None:
            self.ttft.record(ttft, timed)
        usage = obs.usage
        if usage.input_tokens is not None:
            self.prompt_tokens.add(usage.input_tokens, ai)
        if usage.output_tokens is not None:
            self.completion_tokens.add(usage.output_tokens, ai)
            tpot = call.tpot if ttft is not None and call.outcome == OK else None
            if tpot is not None:
                self.tpot.record(tpot, timed)
        for token_type, n in (("input", usage.input_tokens), ("output", usage.output_tokens),
                              ("cached_input", usage.cached_input_tokens),
                              ("cache_creation_input", usage.cache_creation_input_tokens),
                              ("reasoning", usage.reasoning_tokens)):
            if n is not None:
                self.token_usage.record(n, {**genai, "gen_ai.token.type": token_type})
        if call.outcome == OK and not usage.seen():
            self.usage_missing.add(1, {**ai, "operation": operation})
        cost = call.cost
        if isinstance(cost, Cost):
            self.cost.add(cost.total, ai)
        elif cost is not None and cost.reason != "disabled":
            self.unpriced.add(1, {**ai, "reason": cost.reason})
        finish = finish_reason(call)
        if finish is not None:
            self.finish_reasons.add(1, {**ai, "finish_reason": finish})
        if obs.parse_errors:
            self.parse_errors.add(obs.parse_errors, {"llm": provider, "reason": clip(obs.parse_error_reason or "unknown")})
        self.requests.add(1, {**ai, "operation": operation, "status_code": str(call.status), "outcome": call.outcome, "error_type": err})

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Export what is left (bounded by the export timeout) and stop the export thread."""
        if not self.closed:
            self.closed = True
            self.provider.shutdown()


_ACTIVE: list[tuple[int, StatsConfig, OtlpMetrics]] = []  # this process's pipelines: (pid, settings, observer)


def observer(stats: StatsConfig) -> OtlpMetrics:
    """This process's OTLP metrics observer: built once per worker and kept across config reloads
    (``stats`` only changes with a restart), so its counters and instance id carry on."""
    pid = os.getpid()
    _ACTIVE[:] = [e for e in _ACTIVE if e[0] == pid and not e[2].closed]  # a forked worker starts its own
    for _, settings, found in _ACTIVE:
        if settings == stats:
            return found
    made = OtlpMetrics(stats)
    _ACTIVE.append((pid, stats, made))
    return made
