"""The one step that turns a finished call into what the metrics record: its labels, token counts
by type, timings, cost, outcome. The Prometheus (:mod:`extproc.telemetry.metrics`) and OTLP
(:mod:`extproc.telemetry.otlp_metrics`) backends only record a :class:`Measurements`; neither
derives a label or a rule of its own, so the two cannot drift.

Where a change goes:

- **a label on every call metric** (in both backends; all but ``ai_parse_errors`` and the
  self-cost histogram, which keep a small fixed label set): :func:`label_sources`, one function. The configured custom labels (jwt_authn claims, headers,
  attribution: :mod:`extproc.telemetry.labels`) come from there.
- a rule for a value (when TTFT counts, what TPOT is, which calls count as missing usage):
  :meth:`Measurer.measure`.

Values are read as the call reports them (``call.obs.usage``, ``call.cost``): what a token count
means is the parser's business (``extproc.apis``), not this step's.

Per call, the step runs once even with both backends on (they share one :class:`Measurer`, which
remembers its last call); every client- or upstream-chosen label value is cut to 128 characters,
then capped per label at ``stats.maxLabelValues`` distinct values (``__overflow__`` past it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from extproc.apis.finish import finish_reason
from extproc.apis.mcp import operation_label
from extproc.core.bounded import clip
from extproc.core.call import CLIENT_ABORT, NO_RESPONSE, OK, Call
from extproc.core.config import StatsConfig
from extproc.core.pricing import Cost
from extproc.telemetry.labels import OVERFLOW, LabelGuard, LabelSource

__all__ = (
    "DURATION_BUCKETS",
    "LABELS",
    "PROCESSING_BUCKETS",
    "TOKEN_BUCKETS",
    "TOKEN_TYPES",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "Measurements",
    "Measurer",
    "error_type",
    "label_sources",
)

# Histogram boundaries, the same in both backends.
# gen_ai.client.operation.duration advice (0.01 .. 81.92 s, doubling), stretched to 300 s for long
# generations.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84, 300.0)
# gen_ai.server.time_to_first_token advice, from 10 ms, stretched to 300 s (queued/reasoning models).
TTFT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 300.0)
# gen_ai.server.time_per_output_token advice.
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# gen_ai.client.token.usage advice: powers of 4, 1 .. 4M.
TOKEN_BUCKETS = tuple(float(4**i) for i in range(12))
# The sidecar's own time per call (extproc_processing_duration_seconds): tens of microseconds for a
# small call, milliseconds for long streams and large bodies.
PROCESSING_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# The call's labels, in the order of Measurements.labels; the sources' labels follow them.
LABELS = ("llm", "model", "request_model", "response_model", "operation", "error_type", "status_code", "outcome")
# gen_ai.token.type values, in the order of Measurements.tokens.
TOKEN_TYPES = ("input", "output", "cached_input", "cache_creation_input", "reasoning")


class Source(Protocol):
    """A label every call metric carries: its name, and its value for a call ("" when absent)."""

    name: str

    def value(self, call: Call) -> str: ...


def label_sources(stats: StatsConfig) -> tuple[Source, ...]:
    """The labels every call metric carries besides its own: today the configured custom labels
    (``stats.customLabels``). Adding a label to every call metric, in Prometheus and OTLP alike,
    is adding its source here; its name must then be one no family already uses."""
    return tuple(LabelSource(c) for c in stats.custom_labels)


def error_type(call: Call) -> str:
    """OTel ``error.type``: "" for a successful call, else the provider's error type, else the
    HTTP status, else how the exchange ended."""
    if call.outcome == OK:
        return ""
    if call.outcome == CLIENT_ABORT or call.outcome == NO_RESPONSE:
        return call.outcome
    return call.obs.error_type or (str(call.status) if call.status else "_OTHER")


@dataclass(slots=True)
class Measurements:
    """One finished call, as every metrics backend records it. Read-only by convention (a frozen
    dataclass would cost ~1.3 us more per call: one ``object.__setattr__`` per field)."""

    labels: tuple[str, ...]  # values of LABELS, then of the label sources; hashable: backends cache their series by it
    duration: float | None  # first request byte to end of response
    ttft: float | None  # streams with status < 400: request start to first response chunk
    tpot: float | None  # with a TTFT and outcome ok: (complete - first chunk) / (output tokens - 1)
    tokens: tuple[int | None, ...]  # counts in TOKEN_TYPES order, None: not reported
    usage_missing: bool  # outcome ok, yet no usage reported
    cost_usd: float | None  # priced calls
    unpriced: str | None  # why a call to price could not be (unknown_model, no_usage, error)
    finish_reason: str | None  # normalised (extproc.apis.finish), None when the response gave none
    parse_errors: int  # payloads that could not be parsed
    parse_error_reason: str  # the first one's reason, cut to 128 characters
    processing: float  # seconds the sidecar spent in its message handlers for this call (its own cost)

    @property
    def llm(self) -> str:
        return self.labels[0]

    @property
    def model(self) -> str:
        """The request model, else the response model, else "unknown"."""
        return self.labels[1]

    @property
    def operation(self) -> str:
        return self.labels[4]

    @property
    def custom(self) -> tuple[str, ...]:
        """Values of the label sources' labels (:attr:`Measurer.names` order)."""
        return self.labels[len(LABELS) :]


_LABELS_KEPT = 4096  # label sets kept per Measurer (``_measure``); past it the table starts over


class Measurer:
    """Measures finished calls for the metrics backends; one per observer set (its label cap is
    per process, like the backends' series)."""

    __slots__ = ("sources", "names", "guard", "_last_call", "_last", "_kept")

    def __init__(self, stats: StatsConfig) -> None:
        self.sources = label_sources(stats)
        self.names = tuple(s.name for s in self.sources)  # the label sources' label names
        self.guard = LabelGuard(stats.max_label_values)  # its folds: ai_label_values_overflow_total (Prometheus)
        self._last_call: Call | None = None
        self._last: Measurements | None = None
        self._kept: dict[tuple[Any, ...], tuple[str, ...]] = {}  # labels by what they are made of (``_measure``)

    def measure(self, call: Call) -> Measurements | None:
        """``call``'s measurements, or None when it is not an LLM call (a path no API matched).
        Raises ValueError for a negative token count or cost (the backends count it as a failure
        and record nothing of the call). Asked again for the same call (the next backend), the
        same measurements."""
        if call is self._last_call:
            return self._last
        m = self._measure(call) if call.api != "unknown" else None
        self._last_call, self._last = call, m
        return m

    def _labels(self, call: Call) -> tuple[str, ...]:
        obs = call.obs
        fold = self.guard.fold
        request_model = fold("model", clip(obs.request_model or ""))
        response_model = fold("response_model", clip(obs.response_model or ""))
        return (
            fold("llm", clip(call.provider)),
            request_model or response_model or "unknown",
            request_model,
            response_model,
            # MCP methods are not GenAI operations: their own bounded set and cap, so junk methods
            # cannot fill the cap of the operations every other call is recorded under.
            fold("mcp_method", operation_label(obs.operation)) if call.api == "mcp" else fold("operation", clip(obs.operation)),
            fold("error_type", clip(error_type(call))),
            str(call.status),
            call.outcome,
            *[fold(s.name, s.value(call)) for s in self.sources],
        )

    def _measure(self, call: Call) -> Measurements:
        obs = call.obs
        if self.sources:  # custom labels: read from the call each time
            labels = self._labels(call)
        else:
            # The labels of the calls seen before, by what they are made of: a label set whose
            # every value the guard admitted stays what ``_labels`` gives (the guard never
            # forgets a value it admitted, and folding one it holds changes nothing); one with a
            # folded value is made each time, so each fold is counted.
            key = (call.provider, obs.request_model, obs.response_model, obs.operation, call.api, call.status, call.outcome, obs.error_type)
            kept = self._kept
            labels = kept.get(key)  # type: ignore[assignment]
            if labels is None:
                labels = self._labels(call)
                if OVERFLOW not in labels:
                    if len(kept) >= _LABELS_KEPT:
                        kept.clear()
                    kept[key] = labels
        duration = call.duration
        ttft = call.ttft if obs.streaming and call.status < 400 else None
        tpot = call.tpot if ttft is not None and call.outcome == OK else None
        u = obs.usage
        tokens = (u.input_tokens, u.output_tokens, u.cached_input_tokens, u.cache_creation_input_tokens, u.reasoning_tokens)
        cost = call.cost
        cost_usd = unpriced = None
        if isinstance(cost, Cost):
            cost_usd = cost.total
        elif cost is not None and cost.reason != "disabled":
            unpriced = cost.reason
        # Parsers keep only sane counts; a negative one is a bug, never recorded (inline: per call).
        if (
            (u.input_tokens or 0) < 0
            or (u.output_tokens or 0) < 0
            or (u.cached_input_tokens or 0) < 0
            or (u.cache_creation_input_tokens or 0) < 0
            or (u.reasoning_tokens or 0) < 0
        ):
            raise ValueError(f"negative token count: {tokens}")
        if cost_usd is not None and cost_usd < 0:
            raise ValueError(f"negative cost: {cost_usd}")
        return Measurements(
            labels,
            duration,
            ttft,
            tpot,
            tokens,
            call.outcome == OK and not u.seen(),
            cost_usd,
            unpriced,
            finish_reason(call),
            obs.parse_errors,
            clip(obs.parse_error_reason or "unknown") if obs.parse_errors else "",
            call.processing,
        )
