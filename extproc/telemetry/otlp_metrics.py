"""The AI metrics pushed over OTLP with the OpenTelemetry SDK (``stats.otlp`` /
``OTEL_METRICS_EXPORTER=otlp``), besides or instead of the Prometheus endpoint.

The same calls and values as :mod:`extproc.telemetry.metrics` (both record a call's
:class:`~extproc.telemetry.measurements.Measurements`), under OpenTelemetry names:

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
- The sidecar's own cost: ``extproc.processing.duration`` (s), a histogram per LLM call with
  attributes ``llm`` and ``operation``; ``process.cpu.time`` (s, ``cpu.mode`` user/system), the
  worker process's CPU time, read when the reader collects (nothing per call).

One MeterProvider per worker process, its resource carrying a ``service.instance.id`` of its own
(a collector sums the workers). Recording is an in-memory aggregation (straight into the SDK's
aggregations, bound once per label combination: :mod:`extproc.telemetry.otel_compat`); a daemon thread exports
every ``exportIntervalMs``, each export bounded by ``exportTimeoutMs``, so a slow or dead
collector never delays a call. Data points of a failed export are counted in
``ai_otlp_metric_points_dropped_total`` (with the default cumulative temporality the next
successful export carries the totals again). Label values are capped like Prometheus' (per label
``stats.maxLabelValues``, then ``__overflow__``), and each instrument keeps at most
``stats.maxSeries`` attribute sets (the SDK's cardinality limit; beyond it, its overflow set).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
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

from extproc.core.call import Call
from extproc.core.config import StatsConfig
from extproc.telemetry import otel_compat, otlp_settings
from extproc.telemetry.labels import worker_share
from extproc.telemetry.measurements import (
    DURATION_BUCKETS,
    PROCESSING_BUCKETS,
    TOKEN_BUCKETS,
    TOKEN_TYPES,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    Measurements,
    Measurer,
)
from extproc.telemetry.otel_compat import Bound
from extproc.telemetry.otlp_pacing import Pacer

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


def _cpu_time(_options: CallbackOptions) -> Iterable[Observation]:
    t = os.times()  # this process, all threads
    return (Observation(t.user, {"cpu.mode": "user"}), Observation(t.system, {"cpu.mode": "system"}))


_ATTRS_CACHE_MAX = 4096  # label combinations whose bound instruments we keep at hand (then start over)


class _Series:
    """The instruments of one label combination, bound to its attribute sets (built once,
    reused by later calls): recording a value is then the SDK's aggregation alone (see
    :mod:`extproc.telemetry.otel_compat`). Those bound on first use (a finish or unpriced
    reason) are kept per value."""

    __slots__ = (
        "ai",
        "duration",
        "ttft",
        "tpot",
        "prompt",
        "completion",
        "tokens",
        "missing",
        "cost",
        "requests",
        "own",
        "finish",
        "unpriced",
    )

    def __init__(self, o: OtlpMetrics, labels: tuple[str, ...], names: tuple[str, ...]) -> None:
        llm, model, request_model, response_model, operation, err, status, outcome, *values = labels
        custom = dict(zip(names, values))
        ai = self.ai = {"llm": llm, "model": model, **custom}
        genai = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": llm,
            "gen_ai.request.model": request_model,
            "gen_ai.response.model": response_model,
            **custom,
        }
        timed = {**genai, "error.type": err} if err else genai
        self.duration = Bound(o.duration, timed)
        self.ttft = Bound(o.ttft, timed)
        self.tpot = Bound(o.tpot, timed)
        self.prompt = Bound(o.prompt_tokens, ai)
        self.completion = Bound(o.completion_tokens, ai)
        self.cost = Bound(o.cost, ai)
        self.tokens = tuple(Bound(o.token_usage, {**genai, "gen_ai.token.type": t}) for t in TOKEN_TYPES)
        self.missing = Bound(o.usage_missing, {**ai, "operation": operation})
        self.requests = Bound(o.requests, {**ai, "operation": operation, "status_code": status, "outcome": outcome, "error_type": err})
        self.own = Bound(o.processing, {"llm": llm, "operation": operation})
        self.finish: dict[str, Bound] = {}
        self.unpriced: dict[str, Bound] = {}


class OtlpMetrics:
    """The call observer recording each finished LLM call into OTel instruments. Never raises."""

    shared = True  # one per worker, reused by every observer list built there (see observer())

    def __init__(self, stats: StatsConfig, exporter: MetricExporter | None = None) -> None:
        self.stats = stats
        self.instance_id = str(uuid.uuid4())
        self.exporter = CountingExporter(exporter or build_exporter(stats))
        limit = worker_share(stats.max_series)  # the sidecar's budget, divided among its workers
        timeout_ms = otlp_settings.metrics_timeout_ms(stats.otlp)
        # No SDK thread (interval inf): the Pacer exports, within a bounded share of the worker's CPU.
        self.reader = PeriodicExportingMetricReader(
            self.exporter,
            export_interval_millis=math.inf,
            export_timeout_millis=timeout_ms,
            cardinality_limits={
                k: limit for k in (Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge)
            },
        )
        self.provider = MeterProvider(
            resource=resource(self.instance_id),
            metric_readers=[self.reader],
            shutdown_on_exit=False,
            exemplar_filter=otel_compat.EXEMPLAR_FILTER,  # what Bound records assumes
        )
        self.pacer = Pacer(self.reader, otlp_settings.metrics_interval_ms(stats.otlp) / 1000, timeout_ms)
        meter = self.provider.get_meter("envoy-ai-extproc")
        self.measurer = Measurer(stats)  # shared with the Prometheus backend (see observers.py)
        self._series: dict[tuple[str, ...], _Series] = {}
        self._parse_errors: dict[tuple[str, str], Bound] = {}  # (llm, reason): bounded like _series
        self._refused: dict[str, Bound] = {}  # a few fixed reasons
        self.failures = 0
        self.closed = False
        hist = meter.create_histogram
        count = meter.create_counter
        self.token_usage = hist(
            "gen_ai.client.token.usage", "{token}", "Tokens used per call", explicit_bucket_boundaries_advisory=TOKEN_BUCKETS
        )
        self.duration = hist(
            "gen_ai.client.operation.duration",
            "s",
            "Call duration, first request byte to end of response",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.ttft = hist(
            "gen_ai.server.time_to_first_token",
            "s",
            "Streams: request start to first response chunk",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.tpot = hist(
            "gen_ai.server.time_per_output_token",
            "s",
            "Streams: (response complete - first chunk) / (output tokens - 1)",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )
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
        self.processing = hist(
            "extproc.processing.duration",
            "s",
            "Time the sidecar spent in its message handlers per LLM call (waiting excluded)",
            explicit_bucket_boundaries_advisory=PROCESSING_BUCKETS,
        )
        meter.create_observable_counter("process.cpu.time", [_cpu_time], "s", "CPU time of this worker process")
        self._active = Bound(self.active, None)

    def on_stream_start(self) -> None:
        self._active.add(1)

    def on_stream_refused(self, reason: str) -> None:
        bound = self._refused.get(reason)
        if bound is None:
            bound = self._refused[reason] = Bound(self.refused, {"reason": reason})
        bound.add(1)

    def on_call_end(self, call: Call) -> None:
        try:
            self._active.add(-1)
            self.record(call)
        except Exception:  # a metrics bug must never reach the servicer
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.exception("recording OTLP metrics failed", extra={"failures": self.failures})

    def record(self, call: Call) -> None:
        """Measure ``call`` and record it (nothing for a call that is not an LLM call)."""
        m = self.measurer.measure(call)
        if m is not None:
            self.record_measurements(m)

    def record_measurements(self, m: Measurements) -> None:
        a = self._series.get(m.labels)
        if a is None:
            if len(self._series) >= _ATTRS_CACHE_MAX:
                self._series.clear()
            a = self._series[m.labels] = _Series(self, m.labels, self.measurer.names)
        if m.duration is not None:
            a.duration.add(m.duration)
        if m.ttft is not None:
            a.ttft.add(m.ttft)
        tokens = m.tokens
        if tokens[0] is not None:
            a.prompt.add(tokens[0])
        if tokens[1] is not None:
            a.completion.add(tokens[1])
        if m.tpot is not None:
            a.tpot.add(m.tpot)
        for token_usage, n in zip(a.tokens, tokens):
            if n is not None:
                token_usage.add(n)
        if m.usage_missing:
            a.missing.add(1)
        if m.cost_usd is not None:
            a.cost.add(m.cost_usd)
        elif m.unpriced is not None:
            unpriced = a.unpriced.get(m.unpriced)
            if unpriced is None:
                unpriced = a.unpriced[m.unpriced] = Bound(self.unpriced, {**a.ai, "reason": m.unpriced})
            unpriced.add(1)
        if m.finish_reason is not None:
            finish = a.finish.get(m.finish_reason)
            if finish is None:
                finish = a.finish[m.finish_reason] = Bound(self.finish_reasons, {**a.ai, "finish_reason": m.finish_reason})
            finish.add(1)
        if m.parse_errors:
            key = (m.llm, m.parse_error_reason)
            errors = self._parse_errors.get(key)
            if errors is None:
                if len(self._parse_errors) >= _ATTRS_CACHE_MAX:
                    self._parse_errors.clear()
                errors = self._parse_errors[key] = Bound(self.parse_errors, {"llm": key[0], "reason": key[1]})
            errors.add(m.parse_errors)
        a.own.add(m.processing)
        a.requests.add(1)

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Export what is left (bounded by the export timeout) and stop the export thread."""
        if not self.closed:
            self.closed = True
            self.pacer.close(otlp_settings.metrics_timeout_ms(self.stats.otlp) / 1000)
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
