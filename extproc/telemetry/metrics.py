"""Prometheus metrics for LLM calls: kgateway-compatible token counters, OpenTelemetry GenAI
histograms, request outcomes. Updated once per call, when it ends (never per chunk).

The registry is injectable (tests use a fresh ``CollectorRegistry`` each); ``extproc serve`` uses
:func:`process_registry`. With several workers, prometheus-client's multiprocess mode stores the
values in files that the parent's endpoint sums (``extproc.telemetry.prometheus_endpoint``).
"""
from __future__ import annotations

import logging
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from extproc.apis.finish import finish_reason
from extproc.core.bounded import clip
from extproc.core.call import CLIENT_ABORT, NO_RESPONSE, OK, Call
from extproc.core.config import BUILTIN_LABELS, StatsConfig
from extproc.core.pricing import Cost
from extproc.telemetry.labels import LabelGuard, LabelSource, SeriesBudget, folded

log = logging.getLogger("extproc.telemetry.metrics")

# gen_ai.client.operation.duration advice (0.01 .. 81.92 s, doubling), stretched to 300 s for long
# generations.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84, 300.0)
# gen_ai.server.time_to_first_token advice, from 10 ms, stretched to 300 s (queued/reasoning models).
TTFT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 300.0)
# gen_ai.server.time_per_output_token advice.
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# gen_ai.client.token.usage advice: powers of 4, 1 .. 4M.
TOKEN_BUCKETS = tuple(float(4**i) for i in range(12))

GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")
_SERIES_CACHE_MAX = 4096  # label combinations whose children we keep at hand (then start over)

def process_registry() -> CollectorRegistry:
    """The registry of this process's metrics (what a single-worker ``/metrics`` serves):
    prometheus-client's default one, so metrics other modules declare at import (MCP, tracing
    drops) and the process collectors are served too."""
    return REGISTRY


def error_type(call: Call) -> str:
    """OTel ``error.type``: "" for a successful call, else the provider's error type, else the
    HTTP status, else how the exchange ended."""
    if call.outcome == OK:
        return ""
    if call.outcome == CLIENT_ABORT or call.outcome == NO_RESPONSE:
        return call.outcome
    return call.obs.error_type or (str(call.status) if call.status else "_OTHER")


class Metrics:
    """The instruments, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, custom: tuple[str, ...] = ()) -> None:
        c = list(custom)
        ai = ["llm", "model", *c]
        genai = [*GENAI_LABELS, "error_type", *c]
        self.prompt_tokens = Counter("ai_prompt_tokens", "Prompt (input) tokens the provider reported (kgateway-compatible)", ai, registry=registry)
        self.completion_tokens = Counter("ai_completion_tokens", "Completion (output) tokens the provider reported (kgateway-compatible)", ai, registry=registry)
        self.requests = Counter(
            "ai_requests", "LLM calls by outcome (ok, error, client_abort, no_response)",
            ["llm", "model", "operation", "status_code", "outcome", "error_type", *c], registry=registry)
        self.usage_missing = Counter(
            "ai_usage_missing", "Successful LLM responses that reported no token usage (e.g. a stream without include_usage)",
            ["llm", "model", "operation", *c], registry=registry)
        self.cost = Counter("ai_cost_usd", "Cost of LLM calls in US dollars, from the reported usage (see docs/cost.md)", ai, registry=registry)
        self.unpriced = Counter(
            "ai_cost_unpriced", "LLM calls that could not be priced, by reason (unknown_model, no_usage, error)",
            ["llm", "model", "reason", *c], registry=registry)
        self.finish_reasons = Counter(
            "ai_finish_reasons", "LLM responses by how they ended (stop, length, tool_calls, content_filter, error, other)",
            ["llm", "model", "finish_reason", *c], registry=registry)
        self.parse_errors = Counter("ai_parse_errors", "Payloads the sidecar could not parse", ["llm", "reason"], registry=registry)
        self.overflow = Counter(
            "ai_label_values_overflow", "Label values folded into __overflow__ by the cardinality cap (stats.maxLabelValues)",
            ["label"], registry=registry)
        self.series_overflow = Counter(
            "ai_series_overflow", "Observations recorded in an __overflow__ series because their metric family had "
            "stats.maxSeries live series", ["metric"], registry=registry)
        # livesum: across worker processes, the sum over the live ones (a dead worker's streams are gone).
        self.active = Gauge("ai_active_streams", "ext_proc streams (HTTP exchanges) in flight", registry=registry,
                            multiprocess_mode="livesum")
        self.refused = Counter(
            "ai_streams_refused", "ext_proc streams refused as they opened, unobserved (max_streams: the worker held "
            "limits.maxStreams; overloaded: limits.maxWaitingStreams waited for the busy worker; draining: shutting down)", ["reason"], registry=registry)
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens used per call (OpenTelemetry gen_ai.client.token.usage)",
            [*GENAI_LABELS, "gen_ai_token_type", *c], buckets=TOKEN_BUCKETS, registry=registry)
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "Call duration, first request byte to end of response (gen_ai.client.operation.duration)",
            genai, buckets=DURATION_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Streams: request start to first response chunk (gen_ai.server.time_to_first_token)",
            genai, buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Streams: (response complete - first chunk) / (output tokens - 1) (gen_ai.server.time_per_output_token)",
            genai, buckets=TPOT_BUCKETS, registry=registry)

    def label_names(self) -> set[str]:
        names: set[str] = set()
        for m in (self.prompt_tokens, self.completion_tokens, self.requests, self.usage_missing, self.cost, self.unpriced,
                  self.finish_reasons, self.parse_errors,
                  self.overflow, self.series_overflow, self.refused, self.token_usage, self.duration, self.ttft, self.tpot):
            names.update(m._labelnames)
        return names


_INSTRUMENTS: weakref.WeakKeyDictionary[CollectorRegistry, dict[tuple[str, ...], Metrics]] = weakref.WeakKeyDictionary()


def instruments(registry: CollectorRegistry, custom: tuple[str, ...]) -> Metrics:
    """The instruments of ``registry``, registered once per process: building observers again
    (an in-process sidecar in tests, a config reload) reuses them instead of re-registering."""
    per_registry = _INSTRUMENTS.setdefault(registry, {})
    found = per_registry.get(custom)
    if found is None:
        found = per_registry[custom] = Metrics(registry, custom)
    return found


class _Series:
    """The children of one label combination, looked up once and reused by later calls. A slot
    stays None while its family's series budget folds this combination (so each later
    observation is folded, and counted, again)."""

    __slots__ = ("ai", "genai", "req", "miss", "requests", "duration", "ttft", "tpot", "prompt", "completion", "missing", "cost", "tokens",
                 "finish")

    def __init__(self, ai: tuple[str, ...], genai: tuple[str, ...], req: tuple[str, ...], miss: tuple[str, ...]) -> None:
        self.ai = ai  # llm, model, *custom
        self.genai = genai  # operation, provider, request model, response model, error_type, *custom
        self.req = req  # llm, model, operation, status_code, outcome, error_type, *custom
        self.miss = miss  # llm, model, operation, *custom
        self.requests: Any = None  # children: on first use
        self.duration: Any = None
        self.ttft: Any = None
        self.tpot: Any = None
        self.prompt: Any = None
        self.completion: Any = None
        self.missing: Any = None
        self.cost: Any = None
        self.tokens: dict[str, Any] = {}
        self.finish: dict[str, Any] = {}  # finish_reason -> child


def series_per_label_set(metric: Any) -> int:
    """The series one label set of ``metric`` shows: 1, or a histogram's buckets + _sum + _count."""
    bounds = getattr(metric, "_upper_bounds", None)
    return 1 if bounds is None else len(bounds) + 2


_OUTCOME = (4,)  # ai_requests: the outcome keeps its value in the overflow series (four values)
_TOKEN_TYPE = (4,)  # gen_ai_client_token_usage: the token type likewise (five values)
_FINISH = (2,)  # ai_finish_reasons: the finish reason likewise (six values)


class MetricsObserver:
    """A :class:`~extproc.core.call.CallObserver` recording each finished LLM call. Never raises.

    Two caps keep the exposition bounded whatever clients send: per label, ``stats.maxLabelValues``
    distinct values (then ``__overflow__``); per metric family, ``stats.maxSeries`` live series as
    Prometheus counts them (a histogram label set: one per bucket, plus _sum and _count); a call
    whose label set would take a family past it is recorded in the family's ``__overflow__`` label
    set and counted in ``ai_series_overflow_total``. Both are per process.
    """

    def __init__(self, stats: StatsConfig, registry: CollectorRegistry) -> None:
        self.sources = tuple(LabelSource(c) for c in stats.custom_labels)
        self.metrics = instruments(registry, tuple(s.name for s in self.sources))
        unknown = self.metrics.label_names() - BUILTIN_LABELS - {s.name for s in self.sources}
        assert not unknown, f"config.BUILTIN_LABELS misses {unknown}"
        self.guard = LabelGuard(stats.max_label_values)
        self.budget = SeriesBudget(stats.max_series)
        self._series: dict[tuple[object, ...], _Series] = {}
        self.failures = 0

    def on_stream_start(self) -> None:
        self.metrics.active.inc()

    def on_stream_refused(self, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()

    def on_call_end(self, call: Call) -> None:
        try:
            self.metrics.active.dec()
            self.record(call)
        except Exception:  # the one guard: a metrics bug must never reach the servicer
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.exception("recording metrics failed", extra={"failures": self.failures})

    def _child(self, series: _Series | None, slot: str, metric: Any, labels: tuple[str, ...], keep: tuple[int, ...] = ()) -> Any:
        """A new child of ``metric`` (the series budget admits ``labels``: cached in ``slot``),
        else its overflow child (not cached)."""
        if self.budget.admit(metric._name, labels, series_per_label_set(metric)):
            child = metric.labels(*labels)
            if series is not None:
                setattr(series, slot, child)
            return child
        return metric.labels(*folded(labels, keep))

    def record(self, call: Call) -> None:
        if call.api == "unknown":  # not an LLM API path: nothing to account
            return
        obs = call.obs
        fold = self.guard.fold
        m = self.metrics
        # Every client- or upstream-chosen value is cut to 128 characters, then capped per label.
        provider = fold("llm", clip(call.provider))
        request_model = fold("model", clip(obs.request_model or ""))
        response_model = fold("response_model", clip(obs.response_model or ""))
        model = request_model or response_model or "unknown"
        err = fold("error_type", clip(error_type(call)))
        operation = fold("operation", clip(obs.operation))  # MCP: the client's method name
        custom = tuple(fold(s.name, s.value(call)) for s in self.sources)
        key = (provider, model, request_model, response_model, operation, err, call.outcome, call.status, *custom)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= _SERIES_CACHE_MAX:
                self._series.clear()
            series = self._series[key] = _Series(
                (provider, model, *custom), (operation, provider, request_model, response_model, err, *custom),
                (provider, model, operation, str(call.status), call.outcome, err, *custom), (provider, model, operation, *custom))
        new = self._child

        duration = call.duration
        if duration is not None:
            (series.duration or new(series, "duration", m.duration, series.genai)).observe(duration)
        ttft = call.ttft if obs.streaming and call.status < 400 else None
        if ttft is not None:
            (series.ttft or new(series, "ttft", m.ttft, series.genai)).observe(ttft)

        usage = obs.usage
        if usage.input_tokens is not None:
            (series.prompt or new(series, "prompt", m.prompt_tokens, series.ai)).inc(usage.input_tokens)
        if usage.output_tokens is not None:
            (series.completion or new(series, "completion", m.completion_tokens, series.ai)).inc(usage.output_tokens)
            tpot = call.tpot if ttft is not None and call.outcome == OK else None
            if tpot is not None:
                (series.tpot or new(series, "tpot", m.tpot, series.genai)).observe(tpot)
        for token_type, count in (("input", usage.input_tokens), ("output", usage.output_tokens),
                                  ("cached_input", usage.cached_input_tokens),
                                  ("cache_creation_input", usage.cache_creation_input_tokens),
                                  ("reasoning", usage.reasoning_tokens)):
            if count is not None:
                child = series.tokens.get(token_type)
                if child is None:
                    g = series.genai
                    labels = (*g[:4], token_type, *g[5:])
                    if self.budget.admit(m.token_usage._name, labels, series_per_label_set(m.token_usage)):
                        child = series.tokens[token_type] = m.token_usage.labels(*labels)
                    else:
                        child = m.token_usage.labels(*folded(labels, _TOKEN_TYPE))
                child.observe(count)
        if call.outcome == OK and not usage.seen():
            (series.missing or new(series, "missing", m.usage_missing, series.miss)).inc()
        cost = call.cost
        if isinstance(cost, Cost):
            (series.cost or new(series, "cost", m.cost, series.ai)).inc(cost.total)
        elif cost is not None and cost.reason != "disabled":
            new(None, "", m.unpriced, (provider, model, cost.reason, *custom), (2,)).inc()
        finish = finish_reason(call)
        if finish is not None:
            child = series.finish.get(finish)
            if child is None:
                labels = (provider, model, finish, *custom)
                if self.budget.admit(m.finish_reasons._name, labels):
                    child = series.finish[finish] = m.finish_reasons.labels(*labels)
                else:
                    child = m.finish_reasons.labels(*folded(labels, _FINISH))
            child.inc()
        if obs.parse_errors:
            new(None, "", m.parse_errors, (provider, clip(obs.parse_error_reason or "unknown"))).inc(obs.parse_errors)
        if self.guard.overflowed:
            for label, n in self.guard.take_overflows().items():
                m.overflow.labels(label).inc(n)
        requests = series.requests or new(series, "requests", m.requests, series.req, _OUTCOME)
        if self.budget.folded:
            for family, n in self.budget.take_folded().items():
                m.series_overflow.labels(family).inc(n)
        # Last: a scrape that counts a call in ai_requests_total also sees all its other updates.
        requests.inc()
