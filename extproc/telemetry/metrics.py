"""Prometheus metrics for LLM calls: kgateway-compatible token counters, OpenTelemetry GenAI
histograms, request outcomes. Updated once per call, when it ends (never per chunk), from the
call's :class:`~extproc.telemetry.measurements.Measurements`: this module records, it derives no
label or value of its own.

The registry is injectable (tests use a fresh ``CollectorRegistry`` each); ``extproc serve`` uses
:func:`process_registry`. With several workers, prometheus-client's multiprocess mode stores the
values in files that the parent's endpoint sums (``extproc.telemetry.prometheus_endpoint``).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from extproc.core.call import Call
from extproc.core.config import BUILTIN_LABELS, StatsConfig
from extproc.telemetry import prometheus_compat
from extproc.telemetry.labels import SeriesBudget, folded
from extproc.telemetry.measurements import (
    DURATION_BUCKETS,
    PROCESSING_BUCKETS,
    TOKEN_BUCKETS,
    TOKEN_TYPES,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    Measurements,
    Measurer,
    error_type,
)
from extproc.telemetry.prometheus_compat import Record, series_per_label_set

__all__ = (
    "DURATION_BUCKETS",
    "TOKEN_BUCKETS",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "Metrics",
    "MetricsObserver",
    "error_type",
    "process_registry",
)

log = logging.getLogger("extproc.telemetry.metrics")

GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")
_SERIES_CACHE_MAX = 4096  # label combinations whose children we keep at hand (then start over)

# The worker's own CPU time, in the process registry (like the process collector's metrics). A
# gauge, per worker process in multiprocess mode (label pid, live workers only): a counter there
# would be summed over the workers. Cumulative: rate() is the worker's CPU use.
WORKER_CPU = Gauge(
    "extproc_worker_cpu_seconds",
    "CPU seconds (user + system, all threads) this worker process has used "
    "since it started, sampled as LLM calls end (at most once a second); rate() is the worker's CPU use",
    multiprocess_mode="liveall",
)


def process_registry() -> CollectorRegistry:
    """The registry of this process's metrics (what a single-worker ``/metrics`` serves):
    prometheus-client's default one, so metrics other modules declare at import (MCP, tracing
    drops) and the process collectors are served too."""
    return REGISTRY


class Metrics:
    """The instruments, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, custom: tuple[str, ...] = ()) -> None:
        c = list(custom)
        ai = ["llm", "model", *c]
        genai = [*GENAI_LABELS, "error_type", *c]
        self.prompt_tokens = Counter(
            "ai_prompt_tokens", "Prompt (input) tokens the provider reported (kgateway-compatible)", ai, registry=registry
        )
        self.completion_tokens = Counter(
            "ai_completion_tokens", "Completion (output) tokens the provider reported (kgateway-compatible)", ai, registry=registry
        )
        self.requests = Counter(
            "ai_requests",
            "LLM calls by outcome (ok, error, client_abort, no_response)",
            ["llm", "model", "operation", "status_code", "outcome", "error_type", *c],
            registry=registry,
        )
        self.usage_missing = Counter(
            "ai_usage_missing",
            "Successful LLM responses that reported no token usage (e.g. a stream without include_usage)",
            ["llm", "model", "operation", *c],
            registry=registry,
        )
        self.cost = Counter(
            "ai_cost_usd", "Cost of LLM calls in US dollars, from the reported usage (see docs/cost.md)", ai, registry=registry
        )
        self.unpriced = Counter(
            "ai_cost_unpriced",
            "LLM calls that could not be priced, by reason (unknown_model, no_usage, error)",
            ["llm", "model", "reason", *c],
            registry=registry,
        )
        self.finish_reasons = Counter(
            "ai_finish_reasons",
            "LLM responses by how they ended (stop, length, tool_calls, content_filter, error, other)",
            ["llm", "model", "finish_reason", *c],
            registry=registry,
        )
        self.parse_errors = Counter("ai_parse_errors", "Payloads the sidecar could not parse", ["llm", "reason"], registry=registry)
        self.overflow = Counter(
            "ai_label_values_overflow",
            "Label values folded into __overflow__ by the cardinality cap (stats.maxLabelValues)",
            ["label"],
            registry=registry,
        )
        self.series_overflow = Counter(
            "ai_series_overflow",
            "Observations recorded in an __overflow__ series because their metric family had stats.maxSeries live series",
            ["metric"],
            registry=registry,
        )
        # livesum: across worker processes, the sum over the live ones (a dead worker's streams are gone).
        self.active = Gauge(
            "ai_active_streams", "ext_proc streams (HTTP exchanges) in flight", registry=registry, multiprocess_mode="livesum"
        )
        self.refused = Counter(
            "ai_streams_refused",
            "ext_proc streams refused as they opened, unobserved (max_streams: the worker held "
            "limits.maxStreams; overloaded: limits.maxWaitingStreams waited for the busy worker; draining: shutting down)",
            ["reason"],
            registry=registry,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per call (OpenTelemetry gen_ai.client.token.usage)",
            [*GENAI_LABELS, "gen_ai_token_type", *c],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Call duration, first request byte to end of response (gen_ai.client.operation.duration)",
            genai,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streams: request start to first response chunk (gen_ai.server.time_to_first_token)",
            genai,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streams: (response complete - first chunk) / (output tokens - 1) (gen_ai.server.time_per_output_token)",
            genai,
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        # The sidecar's own cost: no custom labels (a per-user self-cost would multiply series for no use).
        self.processing = Histogram(
            "extproc_processing_duration_seconds",
            "Time the sidecar spent in its message handlers per LLM call (parsing, building replies; waiting excluded): its own cost",
            ["llm", "operation"],
            buckets=PROCESSING_BUCKETS,
            registry=registry,
        )

    def label_names(self) -> set[str]:
        names: set[str] = set()
        for m in (
            self.prompt_tokens,
            self.completion_tokens,
            self.requests,
            self.usage_missing,
            self.cost,
            self.unpriced,
            self.finish_reasons,
            self.parse_errors,
            self.overflow,
            self.series_overflow,
            self.refused,
            self.token_usage,
            self.duration,
            self.ttft,
            self.tpot,
            self.processing,
        ):
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
    """How to record into each family for one label combination, found once and reused by later
    calls: a slot holds the child's update (:mod:`extproc.telemetry.prometheus_compat`), or,
    while the family's series budget folds this combination, the update of its overflow child
    that counts the fold (each observation is folded, and counted, again). None: not yet used."""

    __slots__ = (
        "ai",
        "genai",
        "req",
        "miss",
        "own",
        "requests",
        "requests_folds",
        "duration",
        "ttft",
        "tpot",
        "prompt",
        "completion",
        "missing",
        "cost",
        "tokens",
        "finish",
        "processing",
    )

    def __init__(
        self, ai: tuple[str, ...], genai: tuple[str, ...], req: tuple[str, ...], miss: tuple[str, ...], own: tuple[str, ...]
    ) -> None:
        self.ai = ai  # llm, model, *custom
        self.genai = genai  # operation, provider, request model, response model, error_type, *custom
        self.req = req  # llm, model, operation, status_code, outcome, error_type, *custom
        self.miss = miss  # llm, model, operation, *custom
        self.own = own  # llm, operation (the self-cost histogram)
        self.processing: Record | None = None
        self.requests: Record | None = None  # the update alone (its fold counted before the call's folds are taken)
        self.requests_folds = False
        self.duration: Record | None = None
        self.ttft: Record | None = None
        self.tpot: Record | None = None
        self.prompt: Record | None = None
        self.completion: Record | None = None
        self.missing: Record | None = None
        self.cost: Record | None = None
        self.tokens: list[Record | None] = [None] * len(TOKEN_TYPES)  # in TOKEN_TYPES order
        self.finish: dict[str, Record] = {}  # finish_reason -> update


_OUTCOME = (4,)  # ai_requests: the outcome keeps its value in the overflow series (four values)
_TOKEN_TYPE = (4,)  # gen_ai_client_token_usage: the token type likewise (five values)
_FINISH = (2,)  # ai_finish_reasons: the finish reason likewise (six values)


class MetricsObserver:
    """A :class:`~extproc.core.call.CallObserver` recording each finished LLM call. Never raises.

    Two caps keep the exposition bounded whatever clients send: per label, ``stats.maxLabelValues``
    distinct values (then ``__overflow__``: the measurement step's cap); per metric family,
    ``stats.maxSeries`` live series as Prometheus counts them (a histogram label set: one per
    bucket, plus _sum and _count); a call whose label set would take a family past it is recorded
    in the family's ``__overflow__`` label set and counted in ``ai_series_overflow_total``. Both
    are per process.

    ``measurer``: shared with the OTLP backend when both are on, so a call is measured once.
    """

    def __init__(self, stats: StatsConfig, registry: CollectorRegistry, measurer: Measurer | None = None) -> None:
        self.measurer = measurer or Measurer(stats)
        self.guard = self.measurer.guard
        self.metrics = instruments(registry, self.measurer.names)
        unknown = self.metrics.label_names() - BUILTIN_LABELS - set(self.measurer.names)
        assert not unknown, f"config.BUILTIN_LABELS misses {unknown}"
        self.budget = SeriesBudget(stats.max_series)
        self._series: dict[tuple[str, ...], _Series] = {}
        self.failures = 0
        self._cpu_sampled = time.perf_counter()
        WORKER_CPU.set(time.process_time())
        # the streams-in-flight gauge, moved by +1 / -1 per stream (its inc/dec, without the lock)
        self._active = prometheus_compat.adder(self.metrics.active)

    def on_stream_start(self) -> None:
        self._active(1)

    def on_stream_refused(self, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()

    def on_call_end(self, call: Call) -> None:
        try:
            self._active(-1)
            self.record(call)
        except Exception:  # the one guard: a metrics bug must never reach the servicer
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.exception("recording metrics failed", extra={"failures": self.failures})

    def record(self, call: Call) -> None:
        """Measure ``call`` and record it (nothing for a call that is not an LLM call)."""
        if call.end is not None and call.end - self._cpu_sampled >= 1.0:  # call.end: perf_counter, already read
            self._cpu_sampled = call.end
            WORKER_CPU.set(time.process_time())
        m = self.measurer.measure(call)
        if m is not None:
            self.record_measurements(m)

    def _update(self, metric: Any, labels: tuple[str, ...], keep: tuple[int, ...] = ()) -> tuple[Record, Record]:
        """The update of ``metric``'s child for ``labels`` (the series budget admits them), else
        of its overflow child: (for this observation, for the later ones), the latter counting
        each fold as the budget counted this one."""
        update = prometheus_compat.observer if isinstance(metric, Histogram) else prometheus_compat.adder
        family = metric._name
        if self.budget.admit(family, labels, series_per_label_set(metric)):
            now = update(metric.labels(*labels))
            return now, now
        now = update(metric.labels(*folded(labels, keep)))
        budget = self.budget

        def fold(amount: float) -> None:
            budget.fold(family)
            now(amount)

        return now, fold

    def _new(self, series: _Series, slot: str, metric: Any, labels: tuple[str, ...], keep: tuple[int, ...] = ()) -> Record:
        now, later = self._update(metric, labels, keep)
        setattr(series, slot, later)
        return now

    def _once(self, metric: Any, labels: tuple[str, ...], keep: tuple[int, ...]) -> Record:
        """An update not kept (rare labels: unpriced and parse-error reasons)."""
        return self._update(metric, labels, keep)[0]

    def record_measurements(self, m: Measurements) -> None:
        m_ = self.metrics
        key = m.labels
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= _SERIES_CACHE_MAX:
                self._series.clear()
            llm, model, request_model, response_model, operation, err, status, outcome, *custom = key
            series = self._series[key] = _Series(
                (llm, model, *custom),
                (operation, llm, request_model, response_model, err, *custom),
                (llm, model, operation, status, outcome, err, *custom),
                (llm, model, operation, *custom),
                (llm, operation),
            )
        new = self._new

        if m.duration is not None:
            (series.duration or new(series, "duration", m_.duration, series.genai))(m.duration)
        if m.ttft is not None:
            (series.ttft or new(series, "ttft", m_.ttft, series.genai))(m.ttft)
        tokens = m.tokens
        if tokens[0] is not None:
            (series.prompt or new(series, "prompt", m_.prompt_tokens, series.ai))(tokens[0])
        if tokens[1] is not None:
            (series.completion or new(series, "completion", m_.completion_tokens, series.ai))(tokens[1])
        if m.tpot is not None:
            (series.tpot or new(series, "tpot", m_.tpot, series.genai))(m.tpot)
        updates = series.tokens
        for i, count in enumerate(tokens):
            if count is not None:
                update = updates[i]
                if update is None:
                    g = series.genai
                    update, updates[i] = self._update(m_.token_usage, (*g[:4], TOKEN_TYPES[i], *g[5:]), _TOKEN_TYPE)
                update(count)
        if m.usage_missing:
            (series.missing or new(series, "missing", m_.usage_missing, series.miss))(1)
        if m.cost_usd is not None:
            (series.cost or new(series, "cost", m_.cost, series.ai))(m.cost_usd)
        elif m.unpriced is not None:
            a = series.ai
            self._once(m_.unpriced, (a[0], a[1], m.unpriced, *a[2:]), (2,))(1)
        finish = m.finish_reason
        if finish is not None:
            update = series.finish.get(finish)
            if update is None:
                a = series.ai
                update, series.finish[finish] = self._update(m_.finish_reasons, (a[0], a[1], finish, *a[2:]), _FINISH)
            update(1)
        if m.parse_errors:
            self._once(m_.parse_errors, (key[0], m.parse_error_reason), ())(m.parse_errors)
        (series.processing or new(series, "processing", m_.processing, series.own))(m.processing)
        if self.guard.overflowed:
            for label, n in self.guard.take_overflows().items():
                m_.overflow.labels(label).inc(n)
        requests = series.requests  # its fold, if any, counted now: with this call's others, below
        if requests is None:
            requests, later = self._update(m_.requests, series.req, _OUTCOME)
            series.requests, series.requests_folds = requests, later is not requests
        elif series.requests_folds:
            self.budget.fold(m_.requests._name)
        if self.budget.folded:
            for family, n in self.budget.take_folded().items():
                m_.series_overflow.labels(family).inc(n)
        # Last: a scrape that counts a call in ai_requests_total also sees all its other updates.
        requests(1)
