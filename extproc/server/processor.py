"""The ext_proc servicer: a thin per-stream state machine.

One gRPC stream carries one HTTP exchange. Envoy may skip phases (its own 401/403 arrive as
response messages with no request phase), the client may hang up at any point, and a payload may
be garbage: none of that raises into Envoy. Every message gets its reply at once (a constant,
pre-serialised CONTINUE unless there is metadata to hand over), so nothing is ever held back.
Parsing is delegated to the API parser the path selects (a path no API claims gets the
pass-through parser); what the call amounted to is reported once, when the stream ends, to the
observers (metrics, tracing).

State lives in two places: per worker, the :class:`Processor` (its :class:`Settings`, swapped
whole on a reload, its observers and its :class:`WorkerCounters`); per stream, the
:class:`Stream` (the :class:`Call` record, the parser, the response decoder).

The path of one ext_proc message, from the socket to its reply (headers mode; the server module
explains why it takes this route):

1. ``grpc_server._Protocol.data_received``: the bytes Envoy wrote on its HTTP/2 connection.
2. ``h2compat.receive_frames``: plain DATA frames of open ext_proc streams go straight to the
   stream's :class:`MessageBuffer` (``MessageBuffer.add``), as do a new stream's HEADERS (its
   header block decoded once per connection) to grpclib's processor; any other frame goes
   through h2 and grpclib as usual, to the same buffer.
3. ``MessageBuffer.add`` (a frame holding one whole message, Envoy's, at once; any other
   through ``next_message``): the gRPC length prefix is checked
   (``limits.maxGrpcMessageBytes``) and a whole message taken; it is handed to the stream's
   ``grpc_server._Exchange.one`` right there (``MessageBuffer.inline``: a stream has no task unless
   something must be awaited, and a task that waits leaves its messages to ``one`` too), else the
   task (``grpc_server.build_server.handle``) takes it in its loop.
4. ``one``: ``ProcessingRequest.FromString``, then :meth:`Stream.handle` (this module; a
   streamed chunk's message, a response body and nothing else but Envoy's forwarded metadata
   context, is read from its bytes by ``wire.response_body_only`` and handled by
   :meth:`Stream.handle_body_chunk`; a stream in observability mode, after its first message,
   goes to ``_Exchange.one_observed``, which reads its chunks with the ``observability_mode``
   Envoy sets last on each the same way, its reply dropped): the phase
   handler of its kind (``_request_headers``, ``_request_body``, ``_response_headers``,
   ``_response_body``) routes, parses through the API parser (``extproc.apis``), settles and
   prices the call, and returns the reply: a constant of :mod:`extproc.server.replies`, plus the
   dynamic metadata (``telemetry.metadata.encoded``) when something changed; none in
   observability mode.
5. Back in ``one``: the stream's first reply goes out behind its response headers, a constant
   HPACK block (``h2compat.send_response_headers_now``); each reply is written as one DATA frame
   (``h2compat.send_message_now``) to the connection's ``_CoalescingTransport``, which hands
   everything the read produced to the socket in one ``write`` at the end of ``data_received``.
   When flow control (or a paused transport, or a pending HPACK table size update) holds a reply
   back, ``one`` hands the stream to a task (``_Exchange.to_task``), which sends it with grpclib's
   ``send_message``.
6. When the stream ends (Envoy's reset, where its RST_STREAM is received; in observability
   mode the sidecar's own end, where the last message is handled: its trailers a constant HPACK
   block, ``h2compat.send_trailers_now``; its end of stream, in the task's ``finally``; a lost
   connection, a drain), ``_Exchange.close`` calls
   :meth:`Processor.close_stream` -> :meth:`Stream.finish`: the call is settled, priced and
   reported to the observers (:meth:`Processor.report`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.apis.base import ApiParser
from extproc.apis.routing import provider_for_host
from extproc.codecs.encodings import Decoder, make_decoder
from extproc.core.call import CLIENT_ABORT, ERROR, INCOMPLETE_STREAM, NO_RESPONSE, OK, Call, CallObserver
from extproc.core.config import Config
from extproc.core.envoy_names import ATTRIBUTES_KEY
from extproc.core.logs import RateLimited
from extproc.server.counters import WorkerCounters
from extproc.server.http_fields import content_length, read_request_attributes, read_response_attributes, status_code
from extproc.server.pass_through import PASS_THROUGH, PassThrough
from extproc.server.replies import (
    CONTINUE,
    CONTINUE_REQUEST_BODY,
    CONTINUE_REQUEST_HEADERS,
    CONTINUE_RESPONSE_BODY,
    HEADERS_NO_BODY,
    HEADERS_STREAMED,
    SKIP_REQUEST_BODY,
)
from extproc.server.settings import Settings, settings
from extproc.telemetry import metadata

_clock = time.perf_counter  # one global lookup per read on the per-message path
_RESPONSE_FIELDS = frozenset((":status", "content-type", "content-encoding", "content-length"))  # the response headers read
log = logging.getLogger("extproc")
abandoned_log = RateLimited(log)


class Processor:
    """Per-worker state shared by all streams: the settings, the observers, the counters."""

    def __init__(self, config: Config, observers: Sequence[CallObserver] = ()) -> None:
        self.counters = WorkerCounters()
        self.apply(settings(config), observers)

    def apply(self, s: Settings, observers: Sequence[CallObserver]) -> None:
        """Swap in settings built by :func:`settings` (cannot fail part-way; a reload builds them
        first, see ``worker.reconfigure``). Streams in flight are not interrupted: they read
        ``self.settings`` message by message and report to the new observers when they end."""
        self.settings = s
        self.observers = list(observers)
        self._on_start = [o.on_stream_start for o in self.observers if hasattr(o, "on_stream_start")]
        self._on_refused = [o.on_stream_refused for o in self.observers if hasattr(o, "on_stream_refused")]
        # Content capture (prompts, completions) only when an observer asks (tracing.captureContent).
        self.capture = any(getattr(o, "wants_content", False) for o in self.observers)

    def open_stream(self, metadata: Mapping[str, Any] | None = None) -> Stream:
        """The one way to drive an ext_proc stream: ``open_stream`` with the stream's gRPC
        metadata (lower-case keys), then ``stream.handle(req)`` per message (the reply to send, or
        None; ``stream.handle_body_chunk(body)`` for a message that is a response body chunk and
        nothing else, but a metadata context once ``call.forwarded`` is set, read from its
        bytes) until the messages end or ``stream.end_stream``, then
        ``close_stream`` exactly once,
        however the stream ended (see ``grpc_server.build_server``)."""
        stream = Stream(self)
        if metadata:
            _read_grpc_metadata(metadata.items(), self.settings.provider_key, stream)
        self.counters.active += 1
        for hook in self._on_start:
            hook()
        return stream

    def close_stream(self, stream: Stream) -> None:
        self.counters.active -= 1
        stream.finish()

    def refuse(self, reason: str) -> None:
        """A stream was refused as it opened (``max_streams``: the worker holds
        ``limits.maxStreams``; ``overloaded``: ``limits.maxWaitingStreams`` wait for the busy
        worker; ``draining``: shutting down): no call, nothing read; counted per reason."""
        refused = self.counters.refused
        refused[reason] = refused.get(reason, 0) + 1
        for hook in self._on_refused:
            try:
                hook(reason)
            except Exception:
                self.counters.internal_errors += 1
                log.exception("observer hook on_stream_refused failed")

    def report(self, call: Call) -> None:
        for observer in self.observers:
            try:
                observer.on_call_end(call)
            except Exception:  # an observer bug must not break the stream; it is logged loudly
                self.counters.internal_errors += 1
                log.exception("observer %s failed", type(observer).__name__)


def _read_grpc_metadata(md: Iterable[tuple[str, Any]] | None, provider_key: str, stream: Stream) -> None:
    """One pass over the stream's gRPC metadata: the per-route provider (``grpc_initial_metadata``)
    and the W3C trace context Envoy's tracing injects when it traces."""
    for k, v in md or ():
        if k == provider_key:
            stream._grpc_provider = v.decode() if isinstance(v, bytes) else v
        elif k == "traceparent" or k == "tracestate":
            stream.call.trace_context[k] = v.decode() if isinstance(v, bytes) else v


class Stream:
    """The state of one ext_proc stream (= one HTTP exchange): the phase handlers, and how the
    call is settled, priced and finished."""

    __slots__ = (
        "p",
        "call",
        "parser",
        "decoder",
        "held",
        "_grpc_provider",
        "_done",
        "_response_done",
        "_observe_only",
        "_priced",
        "_content_length",
        "_routed",
        "end_stream",
    )

    def __init__(self, processor: Processor) -> None:
        self.p = processor
        self.call = Call(start_time_ns=time.time_ns(), start=time.perf_counter())
        # The API parser once routed; the pass-through parser before, for a path no API claims,
        # once parsing was abandoned, and once the whole response body was parsed.
        self.parser: ApiParser | PassThrough = PASS_THROUGH
        self.decoder: Decoder | None = None
        self.held = 0  # bytes the parser holds, as counted in WorkerCounters.held
        self._grpc_provider: str | None = None
        self._done = False
        self._response_done = False
        # A message came in observability mode: Envoy ignores the replies, so the metadata is
        # neither priced nor encoded per message (the call is priced once, in finish)
        self._observe_only = False
        self._priced: tuple[object, ...] | None = None  # what call.cost was computed from
        self._content_length: int | None = None  # the response's, when it declares one
        self._routed = False  # path, host and method read (request headers, or attributes)
        # The server should end the stream now: in observability mode, once the response has
        # ended (Envoy would otherwise hold the stream open for its deferred_close_timeout, 5 s,
        # before the call is reported). Set by ``handle``: a plain attribute, read per message.
        self.end_stream = False

    @property
    def observe_only(self) -> bool:
        """Whether a message of this stream came in observability mode (``observability_mode``
        set): from then on no reply is built and the call is priced once, when it ends. Set by
        ``handle``, never cleared. The server reads it once per stream, after a message that got
        no reply, to read the stream's later chunks with the flag Envoy sets on each
        (``wire.response_body_only`` with ``observed``, ``grpc_server._Exchange.one_observed``)."""
        return self._observe_only

    def handle(self, req: pb.ProcessingRequest) -> bytes | None:
        """One message from Envoy: the reply to send, or None when there is none (observability
        mode: Envoy expects no reply; the stream is then over at the response's end, see
        ``end_stream``; in observability mode no reply is built, see ``observe_only``). The
        time spent here is added to ``call.processing`` (the self-cost metric). The phase
        handler of the message's kind builds the reply (a streamed chunk's, the common message,
        is dispatched first)."""
        started = _clock()
        observe = req.observability_mode
        if observe:
            self._observe_only = True
        call = self.call
        if call.forwarded is None and req.HasField("metadata_context"):
            call.forwarded = req.metadata_context.filter_metadata
        kind = req.WhichOneof("request")
        try:
            if kind == "response_body":
                msg = req.response_body
                if call.response_start is None:
                    # fewer-messages mode: no headers messages; the first response message
                    # carries the status (and the request line, for a GET) as attributes
                    self._response_start_from(req)
                    reply = self._response_body(msg.body, msg.end_of_stream, first=True)
                else:
                    reply = self._response_body(msg.body, msg.end_of_stream)
            elif kind == "request_headers":
                reply = self._request_headers(req.request_headers)
            elif kind == "request_body":
                if not self._routed:
                    self._route_from(req)  # fewer-messages mode: the request line as attributes
                reply = self._request_body(req.request_body)
            elif kind == "response_headers":
                reply = self._response_headers(req.response_headers)
            else:
                reply = CONTINUE.get(kind)
        except Exception:  # fail open: a bug on one payload never becomes a client error
            reply = self._failed(kind)
        call.processing += _clock() - started
        if self._observe_only:
            self.end_stream = self._response_done
        return None if observe else reply

    def handle_body_chunk(self, body: bytes) -> bytes | None:
        """``handle`` for a message that holds a response body chunk (``body``, not empty) and
        nothing else: no end of stream, no attributes, and no metadata context unless
        ``call.forwarded`` is set (``handle`` reads one only until then): what Envoy sends for
        each streamed chunk after the first, read from the message's bytes by
        ``wire.response_body_only``. The same reply and state as ``handle`` of that message,
        without its protobuf objects. Also for such a message with ``observability_mode`` set on
        a stream already in that mode (``observe_only``): the same state as ``handle``, whose
        reply is then None (the caller drops this one)."""
        started = _clock()
        call = self.call
        try:
            if call.response_start is None:
                self._response_start_from(None)
                reply = self._response_body(body, False, first=True)
            else:
                reply = self._response_body(body, False)
        except Exception:  # fail open, as in ``handle``
            reply = self._failed("response_body")
        call.processing += _clock() - started
        if self._observe_only:
            self.end_stream = self._response_done
        return reply

    def _failed(self, kind: str | None) -> bytes | None:
        """A bug on one payload: counted, logged, nothing more observed on this stream; the
        reply lets the message through."""
        self.p.counters.internal_errors += 1
        log.exception("processing %s failed; observing nothing more on this stream", kind)
        self._release()
        self.call.obs.parse_error("internal_error")
        return CONTINUE.get(kind)  # type: ignore[arg-type]

    # ---- request phase -----------------------------------------------------------------------
    def _request_headers(self, msg: pb.HttpHeaders) -> bytes:
        call = self.call
        headers = call.headers
        for h in msg.headers.headers:
            raw = h.raw_value  # (each read of a field makes a new object)
            if raw:
                try:
                    headers[h.key] = raw.decode()  # UTF-8, as the replacing decode below (no arguments to read)
                except UnicodeDecodeError:
                    headers[h.key] = raw.decode("utf-8", "replace")
            else:
                headers[h.key] = h.value
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
        p = self.p
        s = p.settings
        s.attribution.read(call)  # session, end user, API key id: from the headers read
        match = s.router.resolve(call.path)
        # With budgets, the client's header never names the provider (and so the price): only
        # the route's grpc_initial_metadata does (docs/budgets.md).
        provider = self._grpc_provider or (call.headers.get(s.provider_key) if s.budget is None else None)
        if match is None:
            call.provider = provider or provider_for_host(call.host) or "unknown"
            return False
        # tracing.noCaptureHeader: a request carrying it is not captured (its presence is all that is read)
        capture = p.capture and s.config.tracing.no_capture_header not in call.headers
        parser = match.parser(call.obs, path_model=match.path_model, limits=s.parser_limits, capture=capture)
        self.parser = parser
        call.priced = parser.priced
        call.api = parser.api
        call.provider = provider or match.provider or provider_for_host(call.host) or parser.default_provider
        return True

    def _route_from(self, req: pb.ProcessingRequest) -> None:
        """fewer-messages mode: route by the request attributes of the first message Envoy sends."""
        attrs = req.attributes.get(ATTRIBUTES_KEY)
        if attrs is not None:
            read_request_attributes(attrs, self.call)
            self._route()

    def _request_body(self, msg: pb.HttpBody) -> bytes:
        call = self.call
        if call.response_start is None:  # not after an early reply
            call.request_complete = end = msg.end_of_stream
            parser = self.parser
            parser.feed_request(msg.body, complete=end)
            if not end or self.held:  # chunks held until the body's last (Envoy streams it)
                self._hold(parser.held_bytes())
        return CONTINUE_REQUEST_BODY

    # ---- response phase ----------------------------------------------------------------------
    def _response_headers(self, msg: pb.HttpHeaders) -> bytes | None:
        content_type = encoding = ""
        status = "0"
        for h in msg.headers.headers:
            key = h.key
            if key in _RESPONSE_FIELDS:
                raw = h.raw_value
                value = raw.decode("latin-1") if raw else h.value
                if key == ":status":
                    status = value
                elif key == "content-type":
                    content_type = value
                elif key == "content-length":
                    self._content_length = content_length(value)
                else:
                    encoding = value
        self._response_start(status, content_type, encoding)
        call = self.call
        observed = self.parser.observed
        if msg.end_of_stream:
            self._response_done = True
            self._complete()
        elif not observed:
            self._complete()  # not an LLM path: its body is not observed, the response is all we see
        if self._observe_only:
            return None  # Envoy ignores replies in observability mode: nothing to build
        if call.obs.usage.seen():
            self._price()
        head = HEADERS_STREAMED if observed and not msg.end_of_stream else HEADERS_NO_BODY
        s = self.p.settings
        return head + metadata.encoded(s.config.metadata.namespace, call, s.budget)

    def _response_start(self, status: str, content_type: str, encoding: str) -> None:
        call = self.call
        call.response_start = time.perf_counter()
        call.status = status_code(status)
        parser = self.parser
        parser.start_response(call.status, content_type)
        if encoding and parser.observed:
            self.decoder = make_decoder(encoding, self.p.settings.limits.max_decoded_bytes)

    def _response_start_from(self, req: pb.ProcessingRequest | None) -> None:
        """fewer-messages mode: the response's start, from the attributes of its first body
        message (see :func:`read_response_attributes`), and the request line when no request
        message came (a GET, an early or local reply). ``req`` None: a message without them."""
        attrs = req.attributes.get(ATTRIBUTES_KEY) if req is not None else None
        status = content_type = encoding = ""
        if attrs is not None:
            if not self._routed:
                read_request_attributes(attrs, self.call)
                self._route()
            status, content_type, encoding, self._content_length = read_response_attributes(attrs)
        self._response_start(status, content_type, encoding)
        if not self.parser.observed:
            self._complete()  # not an LLM path: the status is all we observe

    def _response_body(self, body: bytes, end: bool, first: bool = False) -> bytes | None:
        """A response body message's ``body`` and ``end_of_stream``."""
        call = self.call
        if call.first_chunk is None:
            call.first_chunk = time.perf_counter()
        call.response_bytes += len(body)
        # The body is complete once its Content-Length has arrived, which can be a message before
        # Envoy's end_of_stream (an HTTP/1.1 upstream: the data, then an empty end of stream).
        # Envoy hands this chunk to the client on our reply, and a client that has its
        # Content-Length bytes may close at once: Envoy then resets the stream and logs without
        # the end-of-stream reply. So the usage goes on the reply to the chunk that completes it.
        length = self._content_length
        complete = end or (length is not None and call.response_bytes >= length)
        parser = self.parser
        changed = first  # fewer-messages mode: the first response message hands over the metadata
        if parser.observed:
            p = self.p
            limits = p.settings.limits
            decoder = self.decoder
            if decoder is not None:
                body = decoder.decode(body, limits.max_decoded_bytes_per_message)
                if decoder.failed is not None:
                    if decoder.failed == "message_budget":
                        self._abandon("message_budget")
                    else:
                        call.decode_error = decoder.failed
                        call.obs.parse_error("decode_" + decoder.failed)
                        self._release()  # abandon parsing; the bytes flow on untouched
                    parser = PASS_THROUGH  # (takes nothing below)
            # (a message of at most that many bytes cannot hold more lines: not counted)
            if len(body) > limits.max_lines_per_message and parser.work_items(body) > limits.max_lines_per_message:
                self._abandon("message_budget")
            else:
                changed = parser.feed_response(body, complete) or first
                held = parser.held_bytes()
                if held != self.held:
                    self._hold(held)
        if end:
            self._response_done = True
        if not call.outcome and (complete or parser.complete):
            self._settle()
            changed = True  # hand Envoy the outcome on this very message
        if complete:
            self._release()  # the whole body was parsed: nothing more to parse on this stream
        if not changed:
            return CONTINUE_RESPONSE_BODY
        if self._observe_only:
            return None  # Envoy ignores replies in observability mode: nothing to build
        if call.obs.usage.seen():
            self._price()
        s = self.p.settings
        return CONTINUE_RESPONSE_BODY + metadata.encoded(s.config.metadata.namespace, call, s.budget)

    # ---- end ---------------------------------------------------------------------------------
    def _hold(self, held: int) -> None:
        """The parser now holds ``held`` bytes (a request body's chunks, an unparsed response):
        the worker's total follows; past ``limits.maxHeldBytes`` the stream's parsing is abandoned."""
        counters = self.p.counters
        counters.held += held - self.held
        self.held = held
        if counters.held > counters.large:
            counters.large = counters.held
            counters.large_seen()
        if counters.held > self.p.settings.limits.max_held_bytes:
            self._abandon("worker_held_bytes")

    def _release(self) -> None:
        """Stop parsing this stream (the pass-through parser from now on) and give back what its
        parser held."""
        self.parser = PASS_THROUGH
        self.decoder = None
        if self.held:
            self.p.counters.held -= self.held
            self.held = 0

    def _abandon(self, reason: str) -> None:
        """Past a work or memory budget: parsing stops (the traffic is untouched), counted on
        the call (parse error ``reason``) and per worker, logged at most every 10 s."""
        self._release()
        self.call.obs.parse_error(reason)
        abandoned = self.p.counters.abandoned
        abandoned[reason] = abandoned.get(reason, 0) + 1
        abandoned_log.warning("stream parsing abandoned", reason=reason, api=self.call.api, abandoned=abandoned[reason])

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
        if parser.stream_error and not call.obs.finish_reasons:
            call.obs.finish_reasons.append("error")  # the stream ended with an error event
        if call.status >= 400 or parser.stream_error:
            call.outcome = ERROR
        elif parser.complete or not parser.observed:
            call.outcome = OK  # not observed (not an LLM path, or parsing abandoned): the HTTP response ended
        else:
            call.outcome = ERROR
            if call.obs.error_type is None:
                call.obs.error_type = INCOMPLETE_STREAM

    def _price(self) -> None:
        """Price the call from the usage seen so far (again only when the usage or the model
        changed since): the metadata going out with this message, and the observers at the end,
        read the same ``call.cost``."""
        call = self.call
        if not call.priced:  # not an LLM call that consumes tokens
            return
        obs = call.obs
        u = obs.usage
        key = (
            u.input_tokens,
            u.output_tokens,
            u.total_tokens,
            u.cached_input_tokens,
            u.cache_creation_input_tokens,
            u.reasoning_tokens,
            obs.request_model,
            obs.response_model,
        )
        if key == self._priced:
            return
        self._priced = key
        call.cost = self.p.settings.pricer.price(call.provider, obs.request_model, obs.response_model, u, obs.extra.get("service_tier"))

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
        if call.obs.usage.seen() or (call.response_start is not None and call.status < 400):
            self._price()
        if not call.outcome:
            call.outcome = NO_RESPONSE if call.response_start is None else CLIENT_ABORT
        self.p.report(call)
