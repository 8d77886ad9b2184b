"""OTLP traces: one span per LLM call (or MCP JSON-RPC request), built once when the call ends.

The span is a CLIENT span timed like the real request (start = the first ext_proc message, end =
the stream's end) and is the child of, in order: the ``traceparent`` Envoy's own tracing put on
the ext_proc gRPC stream, else the request's ``traceparent`` header, else a new trace. Attributes
follow ``tracing.conventions``: the OpenTelemetry GenAI semantic conventions (here), OpenInference,
Langfuse, OpenLLMetry (their own modules), any of them; ``tracing.fields`` then removes and adds
attributes (CEL, see ``extproc.core.cel``). A request carrying ``tracing.noCaptureHeader`` is
traced without content. Nothing runs per ext_proc message.

No SDK span is built on the call's path: the call's end computes the attributes, reads the parent
and asks the configured sampler (so sampling and drop counting stay exact; the SDK's default,
parent-based always-on, is decided in place from the parent's sampled flag, as it decides), and
queues a compact record. Over OTLP/gRPC the record is the span already written as bytes
(``span_encoding``: the bytes the SDK's encoder writes for the span below; bytes are no work for the
garbage collector while they wait for a full batch), the export thread joins a batch of them into
the request and the SDK's exporter sends it; otherwise the export thread turns records (tuples)
into the SDK's ``ReadableSpan`` (what
``Tracer.start_span`` + ``end`` would have produced, without the span's lock, attribute copies
and processor calls) for the SDK's exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import orjson
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, DEFAULT_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH as _TRACESTATE_MAX_CHARS

from extproc.apis.routing import semconv_name
from extproc.core import cel
from extproc.core.bounded import MAX_LIST_ITEMS, MAX_VALUE_CHARS, bounded_attribute, clip, clip_opt
from extproc.core.call import ERROR, OK, Call
from extproc.core.config import TracingConfig
from extproc.core.envoy_names import JWT_AUTHN_NAMESPACE, JWT_PAYLOAD_KEY
from extproc.core.pricing import Cost
from extproc.core.redact import safe_headers
from extproc.telemetry import langfuse, openllmetry, span_encoding
from extproc.telemetry import openinference as oi
from extproc.telemetry.trace_export import BoundedBatchProcessor, EncodedSpans, build_exporter

log = logging.getLogger("extproc.telemetry.tracing")

DEFAULT_SERVICE_NAME = "envoy-ai-extproc"

# Request parameters (as parsers record them) -> gen_ai.request.* attribute.
PARAM_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "max_output_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
    "stop": "gen_ai.request.stop_sequences",
    "stop_sequences": "gen_ai.request.stop_sequences",
    "dimensions": "gen_ai.embeddings.dimension.count",
    "encoding_format": "gen_ai.request.encoding_formats",
    "reasoning_effort": "openai.request.reasoning_effort",
    "service_tier": "openai.request.service_tier",
}

_OK = Status(StatusCode.OK)
_OK_CODE, _ERROR_CODE, _CLIENT = StatusCode.OK.value, StatusCode.ERROR.value, SpanKind.CLIENT.value
_SAMPLED = int(TraceFlags.SAMPLED)
_RANDOM_TRACE_ID = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))  # W3C level 2 flag (newer SDKs)
SCOPE = InstrumentationScope("envoy-ai-extproc")


def sampler(cfg: TracingConfig) -> Sampler | None:
    """``randomSampling`` decides for requests without a sampled parent; None: OTEL_TRACES_SAMPLER."""
    v = cfg.random_sampling
    if v is None:
        return None
    if v is True:
        return DEFAULT_ON  # ParentBased(ALWAYS_ON), the SDK's own default object
    return ParentBased(ALWAYS_OFF if v is False else TraceIdRatioBased(float(v)))


def resource(cfg: TracingConfig) -> Resource:
    attrs: dict[str, Any] = dict(cfg.resource_attributes)
    if cfg.service_name:
        attrs["service.name"] = cfg.service_name
    res = Resource.create(attrs)  # merges OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME; ours win
    if str(res.attributes.get("service.name", "")).startswith("unknown_service"):
        res = res.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return res


class Tracer:
    """The call observer that turns finished calls into spans.

    ``processor``: by default the bounded queue and export thread (``BoundedBatchProcessor``);
    any SDK ``SpanProcessor`` (tests: ``SimpleSpanProcessor``) gets each ``ReadableSpan`` at once.
    """

    def __init__(self, cfg: TracingConfig, processor: Any = None) -> None:
        self.cfg = cfg
        self.wants_content = cfg.capture_content  # the Processor switches parser capture on
        self.max_chars = cfg.max_content_chars
        self.no_capture_header = cfg.no_capture_header
        self.conventions = frozenset(cfg.conventions)
        # Built once for what it resolves: the sampler (randomSampling, else OTEL_TRACES_SAMPLER),
        # the resource (with OTEL_RESOURCE_ATTRIBUTES) and the id generator. It never sees a span.
        provider = TracerProvider(sampler=sampler(cfg), resource=resource(cfg), shutdown_on_exit=False)
        self.sampler = provider.sampler
        self.parent_based_always_on = self.sampler is DEFAULT_ON  # decided in on_call_end
        self.resource = provider.resource
        self.ids = provider.id_generator
        self.random_trace_ids = bool(getattr(self.ids, "is_trace_id_random", lambda: False)())
        self.request = span_encoding.Request(self.resource, SCOPE)
        if processor is None:
            exporter = build_exporter(cfg)
            processor = BoundedBatchProcessor(
                exporter,
                self.encoded_spans if getattr(exporter, "takes_encoded", False) else self.readable_spans,
                max_queue_size=cfg.max_queue_size,
                max_batch=cfg.max_export_batch_size,
                delay_s=cfg.schedule_delay_ms / 1000,
            )
        self.processor = processor
        # Over OTLP/gRPC a record is its span's bytes, written here at the call's end: a bytes
        # object is not a container, so the spans waiting for a full batch (up to 512 calls) add
        # nothing to the garbage collector's count and are never traversed or promoted by it.
        self.encodes = isinstance(self.processor, BoundedBatchProcessor) and self.processor.prepare == self.encoded_spans
        self._encode_failed = False
        if isinstance(self.processor, BoundedBatchProcessor):
            self._emit = self.processor.add
        else:
            sdk_processor = self.processor
            self._emit = lambda record: sdk_processor.on_end(self.readable_span(record))
        self.fields = cel.compile_fields(cfg.fields.add)
        self.remove_exact = frozenset(n for n in cfg.fields.remove if not n.endswith(".*"))
        self.remove_prefix = tuple(n[:-1] for n in cfg.fields.remove if n.endswith(".*"))
        self.field_errors = 0
        # A CEL field's string value: 1,024 characters, or the content cap when content is captured.
        self.field_chars = max(cel.MAX_FIELD_CHARS, self.max_chars) if self.wants_content else cel.MAX_FIELD_CHARS
        # The GenAI conventions alone, nothing removed or added, the default sampler, spans written
        # at the call's end: the attributes are written as bytes straight from the call
        # (``genai_attribute_bytes``), without the dict the encoder would walk.
        self.one_pass = (
            self.encodes
            and self.parent_based_always_on
            and self.conventions == {"genai"}
            and not (self.remove_exact or self.remove_prefix or self.fields)
        )

    def on_call_end(self, call: Call) -> None:
        if call.api == "unknown" or (call.api == "mcp" and "mcp.method" not in call.obs.extra):
            return  # not an LLM call or JSON-RPC request: Envoy's own tracing covers plain HTTP
        # tracing.noCaptureHeader: the caller asked for no content capture on this call
        capture = self.wants_content and self.no_capture_header not in call.headers
        one_pass = self.one_pass and call.api != "mcp"
        attrs: dict[str, Any] = {}
        if not one_pass:
            attrs = span_attributes(call, capture, self.max_chars, self.conventions)
            if self.remove_exact or self.remove_prefix:
                attrs = {k: v for k, v in attrs.items() if k not in self.remove_exact and not k.startswith(self.remove_prefix)}
            if self.fields:
                self.field_errors += cel.evaluate(self.fields, variables(call, capture), attrs, self.field_chars)
        # What Tracer.start_span does before it builds a span: the parent, the trace id, the sampler.
        carrier = call.trace_context or call.headers
        parent = remote_parent(carrier) if "traceparent" in carrier else None
        if parent is not None and not parent.is_valid:
            parent = None
        trace_id = self.ids.generate_trace_id() if parent is None else parent.trace_id
        name = span_name(call)
        attributes: Mapping[str, Any] | bytes
        if self.parent_based_always_on:
            # The default sampler's decision, as it makes it (the parent's sampled flag; no parent:
            # sampled), without its result object: a sampled parent's trace state, the attributes.
            if parent is not None and not parent.trace_flags.sampled:
                return
            trace_state = None if parent is None else parent.trace_state
            attributes = genai_attribute_bytes(call, capture, self.max_chars) if one_pass else attrs
        else:
            context = None if "traceparent" not in carrier else parent_context(parent)
            decision = self.sampler.should_sample(context, trace_id, name, SpanKind.CLIENT, attrs)
            if not decision.decision.is_sampled():
                return  # (a recorded-but-unsampled span is never exported either)
            trace_state, attributes = decision.trace_state, decision.attributes
        start = call.start_time_ns
        end = start + int((call.duration or 0.0) * 1e9)
        record = (name, trace_id, parent, trace_state, attributes, start, end, _error_type(call))
        if self.encodes:
            try:
                encoded = self.encoded_span(record)
            except Exception:  # the export thread tries again, then the SDK's encoder (encoded_spans)
                if not self._encode_failed:
                    self._encode_failed = True
                    log.exception("span encoding failed; the SDK's encoder takes such spans")
                if one_pass:  # the SDK's encoder takes the attributes as a mapping
                    attrs = span_attributes(call, capture, self.max_chars, self.conventions)
                    record = (name, trace_id, parent, trace_state, attrs, start, end, record[7])
            else:
                self._emit(encoded)
                return
        self._emit(record)

    def encoded_spans(self, batch: list[Any]) -> EncodedSpans:
        """A batch as the OTLP request's bytes (in the export thread): records already written
        (bytes, from ``on_call_end``) as they are, others written here; a record that fails to
        encode goes to the SDK's encoder as a ``ReadableSpan``, in the same request."""
        spans: list[bytes] = []
        fallback: list[ReadableSpan] = []
        for r in batch:
            if type(r) is bytes:
                spans.append(r)
                continue
            try:
                spans.append(self.encoded_span(r))
            except Exception:
                log.exception("span encoding failed; using the SDK's encoder")
                fallback.append(self.readable_span(r))
        return EncodedSpans(self.request.encode(spans), len(batch), fallback)

    def encoded_span(self, record: tuple[Any, ...]) -> bytes:
        """A queued record as ``span_encoding`` writes ``readable_span(record)``."""
        name, trace_id, parent, trace_state, attributes, start, end, error = record
        if error is None:
            code, description = _OK_CODE, None
        else:
            code, description = _ERROR_CODE, clip(error)
        return span_encoding.span(
            trace_id,
            self.ids.generate_span_id(),
            trace_state,
            parent,
            name,
            _CLIENT,
            start,
            end,
            attributes,
            0,
            code,
            description,
        )

    def readable_spans(self, batch: list[tuple[Any, ...]]) -> list[ReadableSpan]:
        return [self.readable_span(r) for r in batch]

    def readable_span(self, record: tuple[Any, ...]) -> ReadableSpan:
        """A queued record as the SDK's finished span (in the export thread)."""
        name, trace_id, parent, trace_state, attributes, start, end, error = record
        random_id = self.random_trace_ids if parent is None else getattr(parent.trace_flags, "random_trace_id", False)
        context = SpanContext(
            trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(_SAMPLED | _RANDOM_TRACE_ID if random_id else _SAMPLED),
            trace_state=trace_state,
        )
        # Sequences as tuples, as the SDK's span stores them (values are already valid attributes).
        attrs = {k: tuple(v) if type(v) is list else v for k, v in attributes.items()}
        return ReadableSpan(
            name=name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attrs,
            kind=SpanKind.CLIENT,
            status=_OK if error is None else Status(StatusCode.ERROR, clip(error)),
            start_time=start,
            end_time=end,
            instrumentation_scope=SCOPE,
        )

    def shutdown(self) -> None:
        self.processor.shutdown()


_TRACEPARENT = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_TRACEPARENT_MAX_CHARS = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
_ZERO_TRACE_ID, _ZERO_SPAN_ID = "0" * 32, "0" * 16


def remote_parent(carrier: Mapping[str, str]) -> SpanContext | None:
    """The remote parent the SDK's W3C propagator (``TraceContextTextMapPropagator.extract``)
    reads from ``traceparent``/``tracestate``, by its rules, without the ``Context`` and span
    objects it wraps it in (a few us per call where Envoy's tracing sends every stream a
    ``traceparent``); None where it finds none: absent, malformed or too long, all-zero ids,
    version ``ff``, version ``00`` with more fields."""
    header = carrier.get("traceparent")
    if not header or len(header) > _TRACEPARENT_MAX_CHARS:
        return None
    match = _TRACEPARENT.search(header)
    if match is None:
        return None
    version, trace_id, span_id, flags, more = match.groups()
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID or version == "ff" or (version == "00" and more):
        return None
    header = carrier.get("tracestate")
    state = None if header is None or len(header) > _TRACESTATE_MAX_CHARS else TraceState.from_header([header])
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16)), trace_state=state)


def parent_context(parent: SpanContext | None) -> Context:
    """The ``Context`` the propagator returns for a carrier with a ``traceparent`` (a sampler's argument)."""
    return Context() if parent is None else set_span_in_context(NonRecordingSpan(parent), Context())


def span_name(call: Call) -> str:
    obs = call.obs
    if call.api == "mcp":
        tool = clip_opt(obs.extra.get("mcp.tool"))
        method = clip(obs.extra.get("mcp.method") or "mcp")
        return f"{method} {tool}" if tool else method
    operation = clip(obs.operation)
    return f"{operation} {clip(obs.request_model)}" if obs.request_model else operation


def span_attributes(call: Call, capture: bool, max_chars: int, conventions: Collection[str] = ("genai",)) -> dict[str, Any]:
    """The span's attributes: the conventions asked for, then those every convention shares
    (who the call was for, server, HTTP status, error type, MCP)."""
    a: dict[str, Any] = {}
    genai = "genai" in conventions
    error = _error_type(call)
    if genai:
        _genai_attributes(a, call, capture, max_chars)
    if "openinference" in conventions:
        oi.add_attributes(a, call, capture, max_chars)
    if "openllmetry" in conventions:
        openllmetry.add_attributes(a, call, capture, max_chars)
    if "langfuse" in conventions:
        langfuse.add_attributes(a, call, capture, max_chars, error)
    _who(a, call.end_user_header or call.obs.end_user, call.session_id, call.key_id, genai)  # Call.end_user
    _server(a, call.host, call.status)
    if call.api == "mcp":
        _mcp_attributes(a, call)
    if error is not None:
        a["error.type"] = clip(error)
    return a


def _genai_attributes(a: dict[str, Any], call: Call, capture: bool, max_chars: int) -> None:
    """The OpenTelemetry GenAI semantic conventions (``tracing.conventions: [genai]``).

    Values a client or upstream chose are cut to 128 characters (lists to 16 items). Written out,
    without ``clip``/``_put`` calls per attribute: this runs for every traced call."""
    _genai_head(a, call)
    obs = call.obs
    u = obs.usage
    v: Any
    if (v := obs.response_id) is not None:
        a["gen_ai.response.id"] = v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS]
    if obs.finish_reasons:
        a["gen_ai.response.finish_reasons"] = [clip(str(r)) for r in dict.fromkeys(obs.finish_reasons)][:MAX_LIST_ITEMS]
    if obs.params:
        for key, value in obs.params.items():
            name = PARAM_ATTRIBUTES.get(key)
            if name is not None:
                v = value if name != "gen_ai.request.stop_sequences" or isinstance(value, list) else [value]
                _put(a, name, bounded_attribute(cel.to_attribute(v)))
    # Normalised counts (input: every input token, cache reads/writes included; output: every
    # output token, reasoning included) and their breakdowns, as the conventions define them.
    if (v := u.input_tokens) is not None:
        a["gen_ai.usage.input_tokens"] = v
    if (v := u.output_tokens) is not None:
        a["gen_ai.usage.output_tokens"] = v
    if (v := u.cached_input_tokens) is not None:
        a["gen_ai.usage.cache_read.input_tokens"] = v
    if (v := u.cache_creation_input_tokens) is not None:
        a["gen_ai.usage.cache_creation.input_tokens"] = v
    if (v := u.reasoning_tokens) is not None:
        a["gen_ai.usage.reasoning.output_tokens"] = v
    cost = call.cost
    if isinstance(cost, Cost):  # USD; Langfuse reads gen_ai.usage.cost
        a["gen_ai.usage.cost"] = cost.total
        a["gen_ai.usage.input_cost"] = cost.input
        a["gen_ai.usage.output_cost"] = cost.output
    if obs.streaming and call.first_chunk is not None:
        a["gen_ai.response.time_to_first_chunk"] = round(call.first_chunk - call.start, 6)  # Call.ttft
    if call.api == "mcp":
        _put(a, "gen_ai.tool.name", clip_opt(obs.extra.get("mcp.tool")))
    if capture:
        _content(a, call, max_chars)


def _genai_head(a: dict[str, Any], call: Call) -> None:
    """The GenAI attributes that lead every span: operation, provider, stream flag, models."""
    obs = call.obs
    v: Any = obs.operation
    a["gen_ai.operation.name"] = v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS]
    if call.api != "mcp":
        provider = _PROVIDER_NAMES.get(call.provider) or _provider_name(call.provider)
        a["gen_ai.provider.name"] = provider
        a["gen_ai.system"] = provider  # the attribute older backends still read
        a["gen_ai.request.stream"] = obs.streaming
    if (v := obs.request_model) is not None:
        a["gen_ai.request.model"] = v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS]
    if (v := obs.response_model) is not None:
        a["gen_ai.response.model"] = v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS]


_A = b"\x4a"  # Span.attributes
# The runs of attributes that lead and end every span and repeat from call to call (operation,
# provider, stream flag, models; who the call was for, server, HTTP status, error type), written
# once per combination of their values: bounded (models and users are chosen by clients).
_HEADS: dict[tuple[Any, ...], bytes] = {}
_TAILS: dict[tuple[Any, ...], bytes] = {}
_RUNS_KEPT = 1024


def genai_attribute_bytes(call: Call, capture: bool, max_chars: int) -> bytes:
    """The span's attribute fields for a call that is not MCP under ``tracing.conventions: [genai]``:
    the bytes ``span_encoding.attributes(b"\\x4a", span_attributes(call, capture, max_chars))``
    writes (``tests/unit/test_span_encoding.py`` holds them equal), in one pass from the call,
    without the dict, its list-to-tuple copies and the encoder's walk over it; the leading and
    trailing runs one lookup each."""
    obs = call.obs
    s = obs.streaming
    head = _HEADS.get((obs.operation, call.provider, s, type(s), obs.request_model, obs.response_model))
    out = [head if head is not None else _head(call)]
    add = out.append
    one = span_encoding.attribute
    v: Any
    if (v := obs.response_id) is not None:
        add(one(_A, "gen_ai.response.id", v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS]))
    if obs.finish_reasons:
        add(one(_A, "gen_ai.response.finish_reasons", [clip(str(r)) for r in dict.fromkeys(obs.finish_reasons)][:MAX_LIST_ITEMS]))
    if obs.params:
        params: dict[str, Any] = {}  # (several parameters name one attribute: the last one's value)
        for key, value in obs.params.items():
            name = PARAM_ATTRIBUTES.get(key)
            if name is not None:
                v = value if name != "gen_ai.request.stop_sequences" or isinstance(value, list) else [value]
                _put(params, name, bounded_attribute(cel.to_attribute(v)))
        add(span_encoding.attributes(_A, params))
    u = obs.usage
    if (v := u.input_tokens) is not None:
        add(one(_A, "gen_ai.usage.input_tokens", v))
    if (v := u.output_tokens) is not None:
        add(one(_A, "gen_ai.usage.output_tokens", v))
    if (v := u.cached_input_tokens) is not None:
        add(one(_A, "gen_ai.usage.cache_read.input_tokens", v))
    if (v := u.cache_creation_input_tokens) is not None:
        add(one(_A, "gen_ai.usage.cache_creation.input_tokens", v))
    if (v := u.reasoning_tokens) is not None:
        add(one(_A, "gen_ai.usage.reasoning.output_tokens", v))
    cost = call.cost
    if isinstance(cost, Cost):
        add(one(_A, "gen_ai.usage.cost", cost.total))
        add(one(_A, "gen_ai.usage.input_cost", cost.input))
        add(one(_A, "gen_ai.usage.output_cost", cost.output))
    if s and call.first_chunk is not None:
        add(one(_A, "gen_ai.response.time_to_first_chunk", round(call.first_chunk - call.start, 6)))
    if capture:
        content: dict[str, Any] = {}
        _content(content, call, max_chars)
        add(span_encoding.attributes(_A, content))
    status = call.status
    ends = (call.end_user_header or obs.end_user, call.session_id, call.key_id, call.host, status, type(status), _error_type(call))
    tail = _TAILS.get(ends)
    add(tail if tail is not None else _tail(ends))
    return b"".join(out)


def _kept(table: dict[tuple[Any, ...], bytes], key: tuple[Any, ...], run: bytes) -> None:
    """Keeps a run under its key where the key is bounded (client-chosen strings <= 128 characters)."""
    if all(type(x) is not str or len(x) <= MAX_VALUE_CHARS for x in key):
        if len(table) >= _RUNS_KEPT:
            table.clear()
        table[key] = run


def _tail(key: tuple[Any, ...]) -> bytes:
    """The trailing run of ``genai_attribute_bytes`` (who the call was for, server, HTTP status,
    error type), written as ``span_attributes`` builds it, from its key."""
    end_user, session_id, key_id, host, status, _, error = key
    a: dict[str, Any] = {}
    _who(a, end_user, session_id, key_id, True)
    _server(a, host, status)
    if error is not None:
        a["error.type"] = clip(error)
    tail = span_encoding.attributes(_A, a)
    _kept(_TAILS, key, tail)
    return tail


def _head(call: Call) -> bytes:
    """The leading run of ``genai_attribute_bytes``: ``_genai_head``'s attributes, written."""
    obs = call.obs
    a: dict[str, Any] = {}
    _genai_head(a, call)
    head = span_encoding.attributes(_A, a)
    _kept(_HEADS, (obs.operation, call.provider, obs.streaming, type(obs.streaming), obs.request_model, obs.response_model), head)
    return head


_PROVIDER_NAMES: dict[str, str] = {}  # our provider name -> gen_ai.provider.name, cut


def _provider_name(provider: str) -> str:
    """``gen_ai.provider.name`` for a provider name, kept (bounded: the names come from config and routes)."""
    name = clip(semconv_name(provider))
    if len(_PROVIDER_NAMES) < 1024:
        _PROVIDER_NAMES[provider] = name
    return name


def _who(a: dict[str, Any], end_user: str | None, session_id: str | None, key_id: str | None, genai: bool) -> None:
    """Who the call was for (extproc.core.attribution; values already cut to 128 characters)."""
    if end_user is not None:
        a["user.id"] = end_user
    if session_id:
        a["session.id"] = session_id
        if genai:
            a["gen_ai.conversation.id"] = session_id
    if key_id is not None:
        a["extproc.key_id"] = key_id


def _server(a: dict[str, Any], host: str | None, status: int | None) -> None:
    """The server the call went to (its host without a port) and the HTTP status it answered."""
    if host:
        a["server.address"] = clip(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
    if status:
        a["http.response.status_code"] = status


def _mcp_attributes(a: dict[str, Any], call: Call) -> None:
    x = call.obs.extra
    _put(a, "mcp.method.name", clip_opt(x.get("mcp.method")))
    _put(a, "jsonrpc.request.id", None if x.get("jsonrpc.id") is None else clip(str(x["jsonrpc.id"])))
    _put(a, "rpc.jsonrpc.error_code", x.get("jsonrpc.error_code"))
    _put(a, "mcp.session.id", clip_opt(call.headers.get("mcp-session-id")))
    _put(a, "mcp.protocol.version", clip_opt(call.headers.get("mcp-protocol-version")))
    a["rpc.system"] = "jsonrpc"


def _error_type(call: Call) -> str | None:
    """None for a call that succeeded (outcome ``ok``, no provider error); else what went wrong:
    the provider's error type, else the HTTP status, else the outcome (``client_abort``, ...)."""
    if call.obs.error_type is not None:
        return call.obs.error_type
    if call.outcome == OK:
        return None
    if call.outcome == ERROR and call.status:
        return str(call.status)
    return call.outcome or "unknown"


def _put(a: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        a[key] = value


# ---- content capture -------------------------------------------------------------------------
def _content(a: dict[str, Any], call: Call, max_chars: int) -> None:
    obs = call.obs
    if obs.input_messages is not None:
        messages = input_messages(obs.input_messages, max_chars)
        if obs.system_apart and messages:
            # the conventions: instructions given apart from the chat history go in their own
            # attribute (an array of parts); a system message inside the history stays in it
            a["gen_ai.system_instructions"] = orjson.dumps(messages[0]["parts"]).decode()
            messages = messages[1:]
        a["gen_ai.input.messages"] = orjson.dumps(messages).decode()
    if obs.output_text:
        text = "".join(obs.output_text)[:max_chars]
        msg: dict[str, Any] = {"role": "assistant", "parts": [{"type": "text", "content": text}]}
        if obs.finish_reasons:
            msg["finish_reason"] = obs.finish_reasons[-1]
        a["gen_ai.output.messages"] = orjson.dumps([msg]).decode()
    args = obs.extra.get("mcp.arguments")
    if args is not None:
        a["gen_ai.tool.call.arguments"] = orjson.dumps(args).decode()[:max_chars]


def input_messages(value: Any, max_chars: int) -> list[dict[str, Any]]:
    """Request messages in the semconv shape ``[{role, parts: [{type, content}]}]``, text capped."""
    budget = [max_chars]
    if isinstance(value, str):
        return [{"role": "user", "parts": [_text(value, budget)]}]
    out = []
    for m in value if isinstance(value, list) else [value]:
        if isinstance(m, str):
            out.append({"role": "user", "parts": [_text(m, budget)]})
        elif isinstance(m, dict):
            out.append({"role": str(m.get("role", "user")), "parts": _parts(m.get("content"), budget)})
    return out


def _parts(content: Any, budget: list[int]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [_text(content, budget)]
    parts = []
    for p in content if isinstance(content, list) else ():
        if isinstance(p, dict) and isinstance(p.get("text"), str):
            parts.append(_text(p["text"], budget))
        elif isinstance(p, dict):
            parts.append({"type": str(p.get("type", "unknown"))})  # images, audio: the kind only
    return parts


def _text(text: str, budget: list[int]) -> dict[str, Any]:
    room = max(budget[0], 0)
    budget[0] -= len(text)
    return {"type": "text", "content": text[:room]}


# ---- CEL variables ---------------------------------------------------------------------------
def variables(call: Call, capture: bool) -> dict[str, Any]:
    obs = call.obs
    u = obs.usage
    llm: dict[str, Any] = {
        "provider": call.provider,
        "operation": obs.operation,
        "streaming": obs.streaming,
        "params": dict(obs.params),
        "finish_reasons": list(obs.finish_reasons),
    }
    for key, value in (
        ("request_model", obs.request_model),
        ("response_model", obs.response_model),
        ("response_id", obs.response_id),
        ("input_tokens", u.input_tokens),
        ("output_tokens", u.output_tokens),
        ("total_tokens", u.total()),
        ("cached_tokens", u.cached_input_tokens),
        ("cache_creation_tokens", u.cache_creation_input_tokens),
        ("reasoning_tokens", u.reasoning_tokens),
        ("end_user", call.end_user),
        ("session_id", call.session_id),
        ("key_id", call.key_id),
    ):
        if value is not None:
            llm[key] = value
    if capture:
        if obs.input_messages is not None:
            llm["prompt"] = [
                {"role": m["role"], "content": "".join(p.get("content", "") for p in m["parts"])}
                for m in input_messages(obs.input_messages, 1 << 62)
            ]
        if obs.output_text:
            llm["completion"] = ["".join(obs.output_text)]
    q = call.path.find("?")
    out: dict[str, Any] = {
        "llm": llm,
        "jwt": jwt_claims(call.forwarded),
        "request": {
            # Any header whose name contains auth, key, token, secret, cookie, password, session,
            # credential or signature never reaches a span (extproc.core.redact).
            "headers": safe_headers(call.headers),
            "path": call.path if q < 0 else call.path[:q],
            "method": call.method,
            "host": call.host,
        },
        "response": {"status": call.status},
        "mcp": {},
    }
    if call.api == "mcp":
        x = obs.extra
        mcp = {
            "method": x.get("mcp.method"),
            "tool": x.get("mcp.tool"),
            "id": x.get("jsonrpc.id"),
            "session_id": call.headers.get("mcp-session-id"),
            "error_code": x.get("jsonrpc.error_code"),
        }
        out["mcp"] = {k: v for k, v in mcp.items() if v is not None}
    return out


def jwt_claims(forwarded: Any) -> dict[str, Any]:
    if not forwarded or JWT_AUTHN_NAMESPACE not in forwarded:
        return {}
    from google.protobuf.json_format import MessageToDict

    claims = MessageToDict(forwarded[JWT_AUTHN_NAMESPACE]).get(JWT_PAYLOAD_KEY)
    return claims if isinstance(claims, dict) else {}
