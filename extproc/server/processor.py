"""The ext_proc servicer: a thin per-stream state machine.

One gRPC stream carries one HTTP exchange. Envoy may skip phases (its own 401/403 arrive as
response messages with no request phase), the client may hang up at any point, and a payload may
be garbage: none of that raises into Envoy. Every message gets its reply at once (a constant,
pre-serialised CONTINUE unless there is metadata to hand over), so nothing is ever held back.
Parsing is delegated to the API parser the path selects; what the call amounted to is reported
once, when the stream ends, to the observers (metrics, tracing).
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc._pb.envoy_api import processing_mode_pb2 as mode_pb
from extproc.apis.base import ApiParser, Limits
from extproc.apis.routing import Route, Router, catalogue_ids, default_routes, provider_for_host, route
from extproc.codecs.encodings import Decoder, make_decoder
from extproc.core.attribution import Attribution
from extproc.core.call import CLIENT_ABORT, ERROR, INCOMPLETE_STREAM, NO_RESPONSE, OK, Call, CallObserver
from extproc.core.config import Config, ConfigError
from extproc.core.envoy_names import ATTRIBUTES_KEY
from extproc.core.logs import RateLimited
from extproc.core.pricing import Pricer
from extproc.telemetry import metadata

log = logging.getLogger("extproc")
abandoned_log = RateLimited(log)

Mode = mode_pb.ProcessingMode


def _reply(**kw: Any) -> bytes:
    msg = pb.ProcessingResponse()
    for name in kw:
        getattr(msg, name).SetInParent()
    return msg.SerializeToString()


# Constant replies, serialised once.
CONTINUE_REQUEST_HEADERS = _reply(request_headers=True)
CONTINUE_RESPONSE_HEADERS = _reply(response_headers=True)
CONTINUE_REQUEST_BODY = _reply(request_body=True)
CONTINUE_RESPONSE_BODY = _reply(response_body=True)
CONTINUE_REQUEST_TRAILERS = _reply(request_trailers=True)
CONTINUE_RESPONSE_TRAILERS = _reply(response_trailers=True)
# An unrecognised path: skip its request body (the response headers still come, for the status).
SKIP_REQUEST_BODY = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(), mode_override=Mode(request_body_mode=Mode.NONE)
).SerializeToString()
# Response-headers replies choosing the response body mode; the metadata is appended to them.
HEADERS_STREAMED = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse(), mode_override=Mode(response_body_mode=Mode.STREAMED)
).SerializeToString()
HEADERS_NO_BODY = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse(), mode_override=Mode(response_body_mode=Mode.NONE)
).SerializeToString()


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a config means to the servicer, built (and checked) before any of it is used,
    so a reload either applies all of it or none (see :func:`settings`)."""

    config: Config
    namespace: str
    provider_key: str
    limits: Limits
    max_decoded: int
    max_message: int
    max_decoded_per_message: int
    max_lines_per_message: int
    max_held: int
    max_streams: int
    max_waiting_streams: int
    router: Router
    pricer: Pricer
    budget: metadata.Budget | None  # ratelimit_cost per call (budgets.enabled)
    attribution: Attribution


def settings(config: Config) -> Settings:
    """Build the servicer's settings from a config; ConfigError names what is wrong (an unknown
    ``providers.routes[].api``). Pure: no threads, no I/O, safe in the supervising parent."""
    lim = config.limits
    routes = default_routes()
    return Settings(
        config=config,
        namespace=config.metadata.namespace,
        provider_key=config.providers.header.lower(),
        limits=Limits(max_body_bytes=lim.max_body_bytes, max_event_bytes=lim.max_event_bytes,
                      max_capture_chars=config.tracing.max_content_chars),
        max_decoded=lim.max_decoded_bytes,
        max_message=lim.max_grpc_message_bytes,
        max_decoded_per_message=lim.max_decoded_bytes_per_message,
        max_lines_per_message=lim.max_lines_per_message,
        max_held=lim.max_held_bytes,
        max_streams=lim.max_streams,
        max_waiting_streams=lim.max_waiting_streams,
        router=Router(routes, extra=_config_routes(config, routes)),
        pricer=Pricer(config.pricing, catalogue_ids()),
        budget=metadata.Budget(config.budgets) if config.budgets.enabled else None,
        attribution=Attribution(config.attribution),
    )


class Processor:
    """Per-process state shared by all streams: config, router, observers."""

    def __init__(self, config: Config, observers: Sequence[CallObserver] = ()) -> None:
        self.active = 0  # streams in flight (tests check it returns to 0)
        self.internal_errors = 0
        self.bad_streams = 0  # streams ended for malformed gRPC input (see message_buffer.BadStream)
        self.held = 0  # bytes held by the parsers of all streams (limits.maxHeldBytes)
        self.large = 0  # bytes held at peaks / received in large messages since the last trim
        self.abandoned: dict[str, int] = {}  # streams whose parsing was abandoned, by reason
        self.refused: dict[str, int] = {}  # streams refused as they opened, by reason (see grpc_server)
        self.apply(settings(config), observers)

    def reconfigure(self, config: Config, observers: Sequence[CallObserver]) -> None:
        """Build the settings of ``config``, then apply them with ``observers`` (nothing changes
        if building fails)."""
        self.apply(settings(config), observers)

    def apply(self, s: Settings, observers: Sequence[CallObserver]) -> None:
        """Swap in settings built by :func:`settings` (cannot fail part-way). Streams in flight
        are not interrupted: they read these settings message by message and report to the new
        observers when they end."""
        self.settings = s
        self.config = s.config
        self.namespace = s.namespace
        self.provider_key = s.provider_key
        self.limits = s.limits
        self.max_decoded = s.max_decoded
        self.max_message = s.max_message
        self.max_decoded_per_message = s.max_decoded_per_message
        self.max_lines_per_message = s.max_lines_per_message
        self.max_held = s.max_held
        self.max_streams = s.max_streams
        self.max_waiting_streams = s.max_waiting_streams
        self.router = s.router
        self.pricer = s.pricer
        self.budget = s.budget
        self.attribution = s.attribution
        self.observers = list(observers)
        self._on_start = [o.on_stream_start for o in self.observers if hasattr(o, "on_stream_start")]
        self._on_refused = [o.on_stream_refused for o in self.observers if hasattr(o, "on_stream_refused")]
        # Content capture (prompts, completions) only when an observer asks (tracing.captureContent).
        self.capture = any(getattr(o, "wants_content", False) for o in self.observers)
        # tracing.noCaptureHeader: a request carrying it is not captured (its presence is all that is read)
        self.no_capture_header = s.config.tracing.no_capture_header

    def trim_due(self) -> bool:
        """True (once) if large buffers were used and released since the last call (see
        :mod:`extproc.server.memory`)."""
        from extproc.server.memory import TRIM_AFTER_BYTES

        if self.large >= TRIM_AFTER_BYTES and self.held < self.large // 2:
            self.large = 0
            return True
        return False

    async def Process(self, requests: AsyncIterator[pb.ProcessingRequest],
                      metadata: Mapping[str, Any] | None = None) -> AsyncIterator[bytes]:
        """One ext_proc stream: ``requests`` as Envoy sends them, ``metadata`` the stream's gRPC
        metadata (lower-case keys); yields each reply, already serialised."""
        stream = self.open_stream(metadata)
        try:
            async for req in requests:
                reply = stream.handle(req)
                if reply is not None:
                    yield reply
                if stream.end_stream:
                    break
        finally:
            self.close_stream(stream)

    def open_stream(self, metadata: Mapping[str, Any] | None = None) -> Stream:
        """What :meth:`Process` does per stream, for a server that drives it message by message:
        ``open_stream``, then ``stream.handle(req)`` per message (the reply to send, or None) until
        the messages end or ``stream.end_stream``, then ``close_stream`` exactly once, however the
        stream ended."""
        stream = Stream(self, None)
        if metadata:
            _read_grpc_metadata(metadata.items(), self.provider_key, stream)
        self.active += 1
        for hook in self._on_start:
            hook()
        return stream

    def close_stream(self, stream: Stream) -> None:
        self.active -= 1
        stream.finish()

    def refuse(self, reason: str) -> None:
        """A stream was refused as it opened (``max_streams``: the worker holds
        ``limits.maxStreams``; ``overloaded``: ``limits.maxWaitingStreams`` wait for the busy
        worker; ``draining``: shutting down): no call, nothing read; counted per reason."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        for hook in self._on_refused:
            try:
                hook(reason)
            except Exception:
                self.internal_errors += 1
                log.exception("observer hook on_stream_refused failed")

    def report(self, call: Call) -> None:
        for observer in self.observers:
            try:
                observer.on_call_end(call)
            except Exception:  # an observer bug must not break the stream; it is logged loudly
                self.internal_errors += 1
                log.exception("observer %s failed", type(observer).__name__)


def _read_grpc_metadata(md: Iterable[tuple[str, Any]] | None, provider_key: str, stream: Stream) -> None:
    """One pass over the stream's gRPC metadata: the per-route provider (``grpc_initial_metadata``)
    and the W3C trace context Envoy's tracing injects when it traces."""
    for k, v in md or ():
        if k == provider_key:
            stream._grpc_provider = v.decode() if isinstance(v, bytes) else v
        elif k == "traceparent" or k == "tracestate":
            stream.call.trace_context[k] = v.decode() if isinstance(v, bytes) else v


def _config_routes(config: Config, routes: list[Route]) -> list[Route]:
    by_api = {r.parser.api: r.parser for r in routes}
    extra = []
    for i, r in enumerate(config.providers.routes):
        parser = by_api.get(r.api)
        if parser is None:
            raise ConfigError(f"providers.routes.{i}.api: unknown api {r.api!r} (known: {', '.join(sorted(by_api))})")
        extra.append(route(r.path_regex, parser, r.provider))
    return extra


class Stream:
    """The state of one ext_proc stream (= one HTTP exchange)."""

    __slots__ = ("p", "call", "parser", "decoder", "held", "_grpc_provider", "_done", "_response_done", "_observe_only",
                 "_priced", "_priceable", "_content_length", "_body_complete", "_routed")

    def __init__(self, processor: Processor, grpc_provider: str | None) -> None:
        self.p = processor
        self.call = Call(start_time_ns=time.time_ns(), start=time.perf_counter())
        self.parser: ApiParser | None = None
        self.decoder: Decoder | None = None
        self.held = 0  # bytes the parser holds, as counted in Processor.held
        self._grpc_provider = grpc_provider
        self._done = False
        self._response_done = False
        self._observe_only = False  # a message came in observability mode
        self._priced: tuple[object, ...] | None = None  # what call.cost was computed from
        self._priceable = False  # an LLM call that consumes tokens (set with its parser)
        self._content_length: int | None = None  # the response's, when it declares one
        self._body_complete = False  # the whole response body has been parsed
        self._routed = False  # path, host and method read (request headers, or attributes)

    def handle(self, req: pb.ProcessingRequest) -> bytes | None:
        """One message from Envoy: the reply to send, or None when there is none (observability
        mode: Envoy expects no reply; the stream is then over at the response's end, see
        ``end_stream``)."""
        reply = self._reply(req)
        if req.observability_mode:
            self._observe_only = True
            return None
        return reply

    def _reply(self, req: pb.ProcessingRequest) -> bytes | None:
        call = self.call
        if call.forwarded is None and req.HasField("metadata_context"):
            call.forwarded = req.metadata_context.filter_metadata
        kind = req.WhichOneof("request")
        try:
            if kind == "response_body":
                if call.response_start is None:
                    # fewer-messages mode: no headers messages; the first response message
                    # carries the status (and the request line, for a GET) as attributes
                    self._response_start_from(req)
                    return self._response_body(req.response_body, first=True)
                return self._response_body(req.response_body)
            if kind == "request_headers":
                return self._request_headers(req.request_headers)
            if kind == "request_body":
                if not self._routed:
                    self._route_from(req)  # fewer-messages mode: the request line as attributes
                return self._request_body(req.request_body)
            if kind == "response_headers":
                return self._response_headers(req.response_headers)
        except Exception:  # fail open: a bug on one payload never becomes a client error
            self.p.internal_errors += 1
            log.exception("processing %s failed; observing nothing more on this stream", kind)
            self._release()
            call.obs.parse_error("internal_error")
        return _CONTINUE.get(kind)

    # ---- request phase -----------------------------------------------------------------------
    def _request_headers(self, msg: pb.HttpHeaders) -> bytes:
        call = self.call
        headers = call.headers
        for h in msg.headers.headers:
            headers[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        call.method = headers.get(":method", "")
        call.path = headers.get(":path", "")
        call.host = headers.get(":authority", "") or headers.get("host", "")
        if not self._route() and not msg.end_of_stream:
            return SKIP_REQUEST_BODY
        return CONTINUE_REQUEST_HEADERS

    def _route(self) -> bool:
        """Pick the parser for ``call.path`` (False: not an LLM path) and name the provider."""
        self._routed = True
        call = self.call
        self.p.attribution.read(call)  # session, end user, API key id: from the headers read
        match = self.p.router.resolve(call.path)
        provider = self._grpc_provider or call.headers.get(self.p.provider_key)
        if match is None:
            call.provider = provider or provider_for_host(call.host) or "unknown"
            return False
        capture = self.p.capture and self.p.no_capture_header not in call.headers
        parser = match.parser(call.obs, path_model=match.path_model, limits=self.p.limits, capture=capture)
        self.parser = parser
        self._priceable = parser.priced
        call.api = parser.api
        call.provider = provider or match.provider or provider_for_host(call.host) or parser.default_provider
        return True

    def _route_from(self, req: pb.ProcessingRequest) -> None:
        """fewer-messages mode: route by the request attributes (``request.path``, ``.host``,
        ``.method``, ``request.headers["name"]``) of the first message Envoy sends."""
        attrs = req.attributes.get(ATTRIBUTES_KEY)
        if attrs is None:
            return
        call = self.call
        headers = call.headers
        for key, v in attrs.fields.items():
            value = _text(v)
            if key == "request.path":
                call.path = value
            elif key == "request.host":
                call.host = value
            elif key == "request.method":
                call.method = value
            elif key.startswith('request.headers["') and key.endswith('"]') and value:
                headers[key[17:-2].lower()] = value
        self._route()

    def _request_body(self, msg: pb.HttpBody) -> bytes:
        parser = self.parser
        if parser is not None and self.call.response_start is None:  # not after an early reply
            self.call.request_complete = msg.end_of_stream
            parser.feed_request(msg.body, complete=msg.end_of_stream)
        return CONTINUE_REQUEST_BODY

    # ---- response phase ----------------------------------------------------------------------
    def _response_headers(self, msg: pb.HttpHeaders) -> bytes:
        content_type = encoding = ""
        status = "0"
        for h in msg.headers.headers:
            key = h.key
            if key == ":status" or key == "content-type" or key == "content-encoding" or key == "content-length":
                value = h.raw_value.decode("latin-1") if h.raw_value else h.value
                if key == ":status":
                    status = value
                elif key == "content-type":
                    content_type = value
                elif key == "content-length":
                    self._content_length = int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None
                else:
                    encoding = value
        self._response_start(status, content_type, encoding)
        call = self.call
        parser = self.parser
        if msg.end_of_stream:
            self._response_done = True
            self._complete()
        elif parser is None:
            self._complete()  # not an LLM path: its body is not observed, the response is all we see
        if call.obs.usage.seen():
            self._price()
        head = HEADERS_STREAMED if parser is not None and not msg.end_of_stream else HEADERS_NO_BODY
        return head + metadata.encoded(self.p.namespace, call, self.p.budget)

    def _response_start(self, status: str, content_type: str, encoding: str) -> None:
        call = self.call
        call.response_start = time.perf_counter()
        # isascii: str.isdigit() accepts "²" and other digits int() refuses
        call.status = int(status) if status.isascii() and status.isdigit() and len(status) <= 3 else 0
        parser = self.parser
        if parser is not None:
            parser.start_response(call.status, content_type)
            if encoding:
                self.decoder = make_decoder(encoding, self.p.max_decoded)

    def _response_start_from(self, req: pb.ProcessingRequest) -> None:
        """fewer-messages mode: the response's start, from the attributes of its first body
        message: ``response.code``, the content type, encoding and length (copied into metadata by
        Envoy's header_to_metadata filter), and the request line when no request message came
        (a GET, an early or local reply)."""
        attrs = req.attributes.get(ATTRIBUTES_KEY)
        status = content_type = encoding = ""
        if attrs is not None:
            if not self._routed:
                self._route_from(req)
            for key, v in attrs.fields.items():
                if key == "response.code":
                    status = _text(v)
                elif key.endswith('["content-type"]'):
                    content_type = _text(v)
                elif key.endswith('["content-encoding"]'):
                    encoding = _text(v)
                elif key.endswith('["content-length"]'):
                    length = _text(v)
                    self._content_length = int(length) if length.isascii() and length.isdigit() and len(length) <= 18 else None
        self._response_start(status, content_type, encoding)
        if self.parser is None:
            self._complete()  # not an LLM path: the status is all we observe

    def _response_body(self, msg: pb.HttpBody, first: bool = False) -> bytes:
        call = self.call
        if call.first_chunk is None:
            call.first_chunk = time.perf_counter()
        body = msg.body
        call.response_bytes += len(body)
        end = msg.end_of_stream
        # The body is complete once its Content-Length has arrived, which can be a message before
        # Envoy's end_of_stream (an HTTP/1.1 upstream: the data, then an empty end of stream).
        # Envoy hands this chunk to the client on our reply, and a client that has its
        # Content-Length bytes may close at once: Envoy then resets the stream and logs without
        # the end-of-stream reply. So the usage goes on the reply to the chunk that completes it.
        length = self._content_length
        complete = end or (length is not None and call.response_bytes >= length)
        parser = self.parser if not self._body_complete else None  # parsed already: nothing more
        changed = first  # fewer-messages mode: the first response message hands over the metadata
        if parser is not None:
            p = self.p
            decoder = self.decoder
            if decoder is not None:
                body = decoder.decode(body, p.max_decoded_per_message)
                if decoder.failed is not None:
                    if decoder.failed == "message_budget":
                        self._abandon("message_budget")
                    else:
                        call.decode_error = decoder.failed
                        call.obs.parse_error("decode_" + decoder.failed)
                        self._release()  # abandon parsing; the bytes flow on untouched
                    parser = None
            if parser is not None:
                if parser.work_items(body) > p.max_lines_per_message:
                    self._abandon("message_budget")
                else:
                    changed = parser.feed_response(body, complete) or first
                    self._body_complete = complete
                    held = parser.held_bytes()
                    if held != self.held:
                        p.held += held - self.held
                        self.held = held
                        if p.held > p.large:
                            p.large = p.held
                        if p.held > p.max_held:
                            self._abandon("worker_held_bytes")
        if end:
            self._response_done = True
        if not call.outcome and (complete or (parser is not None and parser.complete)):
            self._settle()
            changed = True  # hand Envoy the outcome on this very message
        if not changed:
            return CONTINUE_RESPONSE_BODY
        if call.obs.usage.seen():
            self._price()
        return CONTINUE_RESPONSE_BODY + metadata.encoded(self.p.namespace, call, self.p.budget)

    # ---- end ---------------------------------------------------------------------------------
    @property
    def end_stream(self) -> bool:
        """The server should end the stream now: in observability mode, once the response has
        ended (Envoy would otherwise hold the stream open for its deferred_close_timeout, 5 s,
        before the call is reported)."""
        return self._observe_only and self._response_done

    def _release(self) -> None:
        """Stop parsing this stream and give back what its parser held."""
        self.parser = None
        self.decoder = None
        if self.held:
            self.p.held -= self.held
            self.held = 0

    def _abandon(self, reason: str) -> None:
        """Past a work or memory budget: parsing stops (the traffic is untouched), counted on
        the call (parse error ``reason``) and per worker, logged at most every 10 s."""
        self._release()
        self.call.obs.parse_error(reason)
        p = self.p
        p.abandoned[reason] = p.abandoned.get(reason, 0) + 1
        abandoned_log.warning("stream parsing abandoned", reason=reason, api=self.call.api, abandoned=p.abandoned[reason])

    def _complete(self) -> None:
        self.call.outcome = ERROR if self.call.status >= 400 else OK

    def _settle(self) -> None:
        """The response is over: complete by its API's end marker, or ended by the upstream.

        Completion is the parser's protocol fact (``ApiParser.complete``), never "some usage was
        seen". A stream the upstream closed before its end marker is an ``error``
        (``incomplete_stream``); one the client abandoned never gets here (see ``finish``)."""
        call = self.call
        call.completed = time.perf_counter()
        parser = self.parser
        if parser is not None and parser.stream_error and not call.obs.finish_reasons:
            call.obs.finish_reasons.append("error")  # the stream ended with an error event
        if call.status >= 400 or (parser is not None and parser.stream_error):
            call.outcome = ERROR
        elif parser is None or parser.complete:
            call.outcome = OK  # no parser (not an LLM path, or parsing abandoned): the HTTP response ended
        else:
            call.outcome = ERROR
            if call.obs.error_type is None:
                call.obs.error_type = INCOMPLETE_STREAM

    def _price(self) -> None:
        """Price the call from the usage seen so far (again only when the usage or the model
        changed since): the metadata going out with this message, and the observers at the end,
        read the same ``call.cost``."""
        if not self._priceable:
            return
        call = self.call
        obs = call.obs
        u = obs.usage
        key = (u.input_tokens, u.output_tokens, u.total_tokens, u.cached_input_tokens,
               u.cache_creation_input_tokens, u.reasoning_tokens, obs.request_model, obs.response_model)
        if key == self._priced:
            return
        self._priced = key
        call.cost = self.p.pricer.price(call.provider, obs.request_model, obs.response_model, u,
                                        obs.extra.get("service_tier"))

    def finish(self) -> None:
        """The gRPC stream ended (normally, or because Envoy reset it). Report exactly once.

        A call whose response did not reach its end (no end-of-stream, no end marker) is a
        ``client_abort`` (the client or the upstream hung up), whatever usage it showed. Its token
        counts are what the provider had reported when it stopped (input tokens are billed for an
        abandoned stream; Gemini's cumulative output so far); every output (access log, counters,
        histograms, spans) reads the same ``Observation.usage``, so they agree."""
        if self._done:
            return
        self._done = True
        self._release()
        call = self.call
        call.end = time.perf_counter()
        # Price LLM calls that could have cost something: usage seen, or a response that was not
        # an error (a missing usage then counts as unpriced, reason no_usage).
        if (call.obs.usage.seen() or (call.response_start is not None and call.status < 400)):
            self._price()
        if not call.outcome:
            call.outcome = NO_RESPONSE if call.response_start is None else CLIENT_ABORT
        self.p.report(call)


def _text(v: Any) -> str:
    """An attribute's value as text: strings as they are, numbers (``response.code``) as integers."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return str(v.string_value)
    if kind == "number_value":
        return str(int(v.number_value))
    return ""


_CONTINUE = {
    "request_headers": CONTINUE_REQUEST_HEADERS,
    "response_headers": CONTINUE_RESPONSE_HEADERS,
    "request_body": CONTINUE_REQUEST_BODY,
    "response_body": CONTINUE_RESPONSE_BODY,
    "request_trailers": CONTINUE_REQUEST_TRAILERS,
    "response_trailers": CONTINUE_RESPONSE_TRAILERS,
}
