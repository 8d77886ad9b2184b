"""The gRPC server: ext_proc and ``grpc.health.v1`` on grpclib (plain asyncio and ``h2``).

No C core, no poller thread and no cross-thread wake-up per message: the event loop reads Envoy's
frames; an ext_proc message that arrives while its stream's task waits is answered right there
(``MessageBuffer.inline``), the rest by the stream's task; and everything a connection has to send
leaves in one ``write`` per read or loop iteration (see ``_CoalescingTransport``). Servers have
``start()`` and ``stop(grace)``; :mod:`extproc.server.worker` drives them.

grpclib provides the HTTP/2 connection handling (``H2Protocol``) and per-stream request handling
(``Handler`` / ``request_handler``: headers, deadlines, trailers, resets). We add here: the
pass-through codec, the ext_proc streams' receive path (a read walked frame by frame: a new
stream's HEADERS, its header block decoded once per connection, its DATA frames and Envoy's
RST_STREAM past h2's parser, the DATA into a :class:`MessageBuffer`; any other frame through h2
on its own), the listener (TCP with SO_REUSEPORT, ``unix:``, TLS), the health service on
``grpc_health``'s messages, and a graceful stop (grpclib's own ``Server.close`` cancels every
stream at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.const import Cardinality, Status
from grpclib.const import Handler as MethodHandler
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError
from grpclib.metadata import decode_metadata
from grpclib.protocol import H2Protocol
from grpclib.server import Handler, Stream
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from multidict import MultiDictProxy

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.config import MIN_GRPC_MESSAGE_BYTES, TlsConfig
from extproc.core.envoy_names import EXT_PROC_METHOD
from extproc.core.logs import RateLimited
from extproc.server import h2compat
from extproc.server.message_buffer import BadStream, MessageBuffer
from extproc.server.processor import Processor
from extproc.server.tls import ssl_context, warn_if_plaintext
from extproc.server.wire import response_body_only

log = logging.getLogger("extproc")
# grpclib logs every stream Envoy resets (a client that hung up) at INFO: routine here; h2 and
# hpack log every frame and header at DEBUG.
for _name in ("grpclib", "h2", "hpack"):
    logging.getLogger(_name).setLevel(logging.WARNING)
h2compat.lazy_frame_repr()

PROCESS = EXT_PROC_METHOD
# grpc core (grpcio) does not limit concurrent streams per connection; h2 defaults to 100.
MAX_CONCURRENT_STREAMS = 2**31 - 1
# h2 remembers how each of a connection's last 65,536 closed streams ended (~115 B each), to
# answer late frames for them correctly: ~7.5 MB per long-lived Envoy connection, reached after
# 65,536 calls (the soak showed it as RSS creeping up for minutes). Envoy keeps a handful of
# streams open per connection, so the last 1,024 are plenty.
CLOSED_STREAMS_KEPT = 1024


class _Codec(CodecBase):
    """Requests are decoded with the handler's type; replies may be already-serialised bytes."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message if message.__class__ is bytes else message.SerializeToString()

    def decode(self, data: bytes, message_type: Any) -> Any:
        return message_type.FromString(data)


class _CoalescingTransport:
    """Stands in for a connection's transport: writes made during one event-loop iteration
    (HEADERS + DATA of a first reply, replies of several streams, WINDOW_UPDATEs) are joined and
    handed to the socket once, at the next iteration, or at the end of the read that made them.

    A write schedules that flush (``call_soon``) unless one is due already (``_scheduled``).
    ``_Protocol.data_received`` marks one due while it handles a read and flushes at its end,
    so the writes a read makes (a streamed chunk's reply) cost no event-loop callback of their
    own; writes made elsewhere (a stream's task, a timer) schedule the flush."""

    __slots__ = ("_t", "_buf", "_scheduled", "_loop")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._t = transport
        self._buf: list[bytes] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if data:
            self._buf.append(data)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        buf = self._buf
        if buf:
            data = buf[0] if len(buf) == 1 else b"".join(buf)
            buf.clear()
            if not self._t.is_closing():
                self._t.write(data)

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def close(self) -> None:
        self.flush()
        self._t.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._t.get_extra_info(name, default)


class _Handler(Handler):
    """grpclib's per-connection request dispatcher. A new stream is refused (REFUSED_STREAM,
    nothing of it read) while draining, and a capped method's stream while the worker holds
    its :class:`StreamCap` (one count across the worker's connections)."""

    def __init__(self, owner: GrpclibServer, *args: Any) -> None:
        super().__init__(*args)
        self._owner = owner
        self.untasked: set[_Exchange] = set()  # this connection's streams handled without a task

    def accept(self, stream: Any, headers: Any, release_stream: Callable[[], Any]) -> None:
        owner = self._owner
        path = _path(headers)
        cap = owner.cap if owner.cap is not None and path == owner.cap.path else None
        reason = "draining" if owner.draining else cap.full() if cap is not None else None
        if reason is not None:
            stream.reset_nowait(ErrorCodes.REFUSED_STREAM)
            release_stream()
            if cap is not None:
                cap.on_refused(reason)
            return
        buffer = owner.buffers.get(path) if path is not None else None
        if buffer is not None:
            h2compat.use_buffer(stream, buffer(h2compat.acknowledger(stream)))
            start = owner.untasked.get(path or "")
            if start is not None and start(self, stream, headers, release_stream):
                return  # handled where its frames arrive (``_Exchange``)
        self.start_task(stream, headers, release_stream, cap)

    def start_task(self, stream: Any, headers: Any, release_stream: Callable[[], Any], cap: StreamCap | None) -> asyncio.Task[Any]:
        """grpclib's request handler for ``stream`` in a task of its own (it calls the method's handler)."""
        super().accept(stream, headers, release_stream)
        task = h2compat.forget_when_done(self, stream)
        if cap is not None:
            cap.opened(task)
        return task

    def cancel(self, stream: Any) -> None:
        h2compat.cancel_stream(self, stream)

    def close(self) -> None:
        for exchange in list(self.untasked):  # the connection is gone: each call is reported
            exchange.close()
        super().close()


class StreamCap:
    """How many streams of one method (ext_proc's ``Process``) a worker takes on, read per new
    stream (a reload applies at once):

    - ``max_open()``: streams open at once (``limits.maxStreams``): refused past it with reason
      ``max_streams``;
    - ``max_waiting()``: streams accepted whose handler has not started yet because the event
      loop is busy with others (``limits.maxWaitingStreams``): refused past it with reason
      ``overloaded``, once the oldest of them has waited ``WAIT_GRACE`` (a burst of streams
      arriving together on a healthy worker is accepted in full). In normal operation none
      waits; when Envoy sends more than the worker can process (observability mode never waits
      for replies) they pile up with everything Envoy sent on them, so this is what bounds a
      worker's memory under overload.

    Counted at accept and released by the task's done callback (a task cancelled before it ran
    never runs its own ``finally``).

    A stream handled without a task (``_Exchange``) never waits: its messages are handled as its
    frames are read, so when Envoy sends more than the worker can process the backlog stays in
    the socket, unread, and no stream ever counts as waiting. ``behind()`` keeps the bound
    working: a beat ``BEAT`` s after a new stream measures how late the event loop runs; while it
    runs ``LATE`` behind, new streams are given tasks as before, which wait, and are counted and
    refused as above.

    The beat is a timer, and a timer that fires while the loop sleeps is a wake-up of its own
    (~30-130 us of CPU on a small VM, like a streamed chunk's): so a beat that finds the loop on
    time schedules no next one; the next new stream does. While the loop runs behind, beats go on
    every ``BEAT`` s, as long as streams are open. Only new streams read the result, and a new
    stream arriving while no beat is due arms one: a worker that falls behind is seen one beat
    after its first new stream at the latest, as it was with a beat always scheduled, and a worker
    that keeps up with a stream or two wakes once per new stream, not every ``BEAT`` s."""

    WAIT_GRACE = 0.05  # seconds
    BEAT = 0.025  # seconds from a new stream (or a late beat) to the next measure of the event loop's lateness
    LATE = 0.02  # seconds behind from which new streams get tasks (and can count as waiting)

    def __init__(self, path: str, max_open: Callable[[], int], max_waiting: Callable[[], int], on_refused: Callable[[str], None]) -> None:
        self.path = path
        self.max_open = max_open
        self.max_waiting = max_waiting
        self.on_refused = on_refused
        self.open = 0
        # accept time of each stream not started yet, oldest first (dicts keep insertion order)
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self._clock = time.monotonic
        self.late = False  # the last beat ran LATE behind
        self._due: float | None = None  # when the next beat is due (None: no beat scheduled)

    def behind(self) -> bool:
        """Whether the event loop ran its last beat ``LATE`` behind (and so new streams should
        get tasks, to be counted as waiting); a new stream arms a beat if none is due."""
        if self._due is None:
            loop = asyncio.get_running_loop()
            self._due = loop.time() + self.BEAT
            loop.call_at(self._due, self._beat, loop)
        return self.late

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        """One measure of the loop's lateness: the next beat follows only while it runs behind
        with streams open (on time, the next new stream arms it)."""
        now = loop.time()
        if now - (self._due or now) >= self.LATE and (self.open or self.waiting):
            self.late = True
            self._due = now + self.BEAT
            loop.call_at(self._due, self._beat, loop)
        else:
            self._due = None
            self.late = False

    def full(self) -> str | None:
        if self.open >= self.max_open():
            return "max_streams"
        waiting = self.waiting
        if len(waiting) >= self.max_waiting() and self._clock() - next(iter(waiting.values())) >= self.WAIT_GRACE:
            return "overloaded"
        return None

    def opened(self, task: asyncio.Task[Any]) -> None:
        self.open += 1
        self.waiting[task] = self._clock()
        task.add_done_callback(self._closed)

    def taken(self) -> None:
        """A stream handled without a task (never waiting: it is handled as its frames arrive)."""
        self.open += 1

    def released(self) -> None:
        self.open -= 1

    def started(self, task: asyncio.Task[Any] | None) -> None:
        self.waiting.pop(task, None)  # type: ignore[arg-type]

    def _closed(self, task: asyncio.Task[Any]) -> None:
        self.open -= 1
        self.waiting.pop(task, None)


def _path(headers: Any) -> str | None:
    for name, value in headers:
        if name == ":path":
            return value  # type: ignore[no-any-return]
    return None


class _Protocol(H2Protocol):
    def __init__(self, owner: GrpclibServer, handler: _Handler, config: Any, h2_config: H2Configuration) -> None:
        super().__init__(handler, config, h2_config)
        self._owner = owner
        self._goaway_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._owner._protocols.add(self)
        self._out = _CoalescingTransport(transport)  # type: ignore[arg-type]
        super().connection_made(self._out)  # type: ignore[arg-type]
        h2compat.on_stream_reset(self, self._stream_reset)
        h2compat.h2_connection(self).update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        h2compat.limit_closed_streams(self, CLOSED_STREAMS_KEPT)
        h2compat.cache_header_blocks(self)
        self.connection.flush()
        if self._owner.draining:
            self.goaway()

    def _stream_reset(self, stream_id: int) -> None:
        """Envoy resets (RST_STREAM) most ext_proc streams when its filter is done with them, so
        this is the common way a stream ends. grpclib would also hand the stream's task a
        ``StreamTerminatedError`` kept on its ``Wrapper``: a reference cycle through the
        traceback's frames per stream, i.e. cyclic garbage that made full GC passes of 100-200 ms
        under load. Cancelling the task is enough (the Processor's ``finally`` reports the call);
        a stream handled without a task is closed (and its call reported) right here. Envoy's
        RST_STREAM comes here from ``h2compat.receive_frames`` without h2's parser or event;
        a reset h2 makes itself (a stream error) through h2 and grpclib's processor."""
        stream = h2compat.stream_of(self, stream_id)
        if stream is not None:
            exchange = self._owner.exchanges.get(stream)
            if exchange is not None and not exchange.tasked:
                exchange.close()  # no task to cancel: the call is reported here
            else:
                self.handler.cancel(stream)
        self.connection.streams_failed += 1

    def data_received(self, data: bytes) -> None:
        # The frames of ext_proc streams (a new stream's HEADERS, the DATA frames of its messages)
        # go straight to their streams (h2compat.receive_frames); any other whole frame goes to
        # h2 and grpclib on its own, and the loop goes on past it; from a partial frame on, the
        # rest goes to h2 as it is.
        # What handling this read produces (replies made inline, window updates) leaves at its
        # end, in one write, without a callback scheduled for it: no further event-loop
        # iteration or callback per streamed chunk.
        out = self._out
        out._scheduled = True  # this read's writes schedule no flush: it comes below
        try:
            end = len(data)
            offset = h2compat.receive_frames(self, data)
            while offset < end:
                stop = h2compat.frame_end(self, data, offset)
                if not stop:
                    super().data_received(data[offset:] if offset else data)
                    break
                super().data_received(data[offset:stop])
                if h2compat.failed(self):  # a protocol error: the connection is closed, the rest unread
                    break
                offset = h2compat.receive_frames(self, data, stop)
        finally:
            out.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._owner._protocols.discard(self)
        super().connection_lost(exc)

    def goaway(self) -> None:
        """Tell the client to open no more streams here; the streams it has keep working."""
        if self._goaway_sent or self.connection.is_closing():
            return
        self._goaway_sent = True
        h2compat.send_goaway(self)

    def close(self) -> None:
        self.goaway()
        self.connection.close()


_H2_CONFIG = H2Configuration(  # as grpclib's Server
    client_side=False,
    header_encoding="ascii",
    validate_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_inbound_headers=False,
    normalize_outbound_headers=False,
)


class GrpclibServer:
    """One listening address and the gRPC services on it; ``start()`` / ``stop(grace)``."""

    def __init__(self, address: str, tls: TlsConfig | None = None) -> None:
        self.address = address
        self._ssl = ssl_context(tls) if warn_if_plaintext(address, tls) and tls is not None else None
        self._mapping: dict[str, MethodHandler] = {}
        self._codec = _Codec()
        self._config = h2compat.server_configuration()
        self._dispatch = h2compat.server_events()
        self._protocols: set[_Protocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inflight: set[asyncio.Task[Any]] = set()  # streams a drain waits for (ext_proc, not health Watch)
        self.draining = False
        self.cap: StreamCap | None = None  # one method's streams can be capped (ext_proc's)
        # methods whose streams get another receive buffer (ext_proc's: a MessageBuffer), made
        # from the stream's acknowledge function
        self.buffers: dict[str, Callable[[Callable[[int], None]], Any]] = {}
        # methods whose streams can be taken without a task (ext_proc's): ``start(handler, stream,
        # headers, release_stream)`` returns whether it took the stream
        self.untasked: dict[str, Callable[[_Handler, Any, Any, Callable[[], Any]], bool]] = {}
        # streams opened without a task, until they close (with or without a task by then)
        self.exchanges: dict[Any, _Exchange] = {}
        self.idle: asyncio.Future[None] | None = None  # set when ``exchanges`` empties, while a drain waits

    def add_method(
        self,
        path: str,
        func: Callable[[Stream], Any],
        cardinality: Cardinality,
        request_type: Any,
        reply_type: Any,
        *,
        drain_waits: bool = False,
    ) -> None:
        if drain_waits:
            func = self._tracked(func)
        self._mapping[path] = MethodHandler(func, cardinality, request_type, reply_type)

    def _tracked(self, func: Callable[[Stream], Any]) -> Callable[[Stream], Any]:
        inflight = self._inflight

        async def run(stream: Stream) -> None:
            # No local reference to the task: a cancelled task keeps its CancelledError, whose
            # traceback keeps this frame (a cycle otherwise).
            inflight.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await func(stream)
            finally:
                inflight.discard(asyncio.current_task())  # type: ignore[arg-type]

        return run

    def _protocol_factory(self) -> _Protocol:
        handler = _Handler(self, self._mapping, self._codec, None, self._dispatch)
        return _Protocol(self, handler, self._config, _H2_CONFIG)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.address.startswith("unix:"):
                self._server = await loop.create_unix_server(self._protocol_factory, self.address[5:])
            else:
                host, _, port = self.address.rpartition(":")
                self._server = await loop.create_server(
                    self._protocol_factory, host.strip("[]") or None, int(port), reuse_address=True, reuse_port=True, ssl=self._ssl
                )
        except OSError as e:
            raise OSError(f"cannot listen on {self.address}: {e.strerror or e}") from None

    async def _drained(self, grace: float) -> None:
        """Until the ext_proc streams in flight (tasks and streams without one) have ended, or ``grace`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            while self._inflight or self.exchanges:
                waits: set[asyncio.Future[Any]] = set(self._inflight)
                if self.exchanges:
                    self.idle = loop.create_future()
                    waits.add(self.idle)
                remaining = deadline - loop.time()
                if remaining <= 0 or not (await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED))[0]:
                    return
        finally:
            self.idle = None

    async def stop(self, grace: float | None) -> None:
        """No new streams from now on (listener closed, GOAWAY on
        every connection, streams opened anyway are refused), the ext_proc streams in flight get
        ``grace`` seconds, then every stream still open is cancelled and the connections closed."""
        if self._server is None:
            return
        self.draining = True
        self._server.close()
        for p in list(self._protocols):
            p.goaway()
        if grace:
            await self._drained(grace)
        handlers = [p.handler for p in self._protocols]
        for h in handlers:
            h.close()  # cancels its stream tasks (their ``finally`` blocks run)
        pending = [t for h in handlers for t in h2compat.cancelled_tasks(h)]  # type: ignore[arg-type]
        if pending:
            await asyncio.wait(pending, timeout=5)
        for p in list(self._protocols):
            p.close()
        await asyncio.sleep(0)  # let the transports flush and close


_PARSE = pb.ProcessingRequest.FromString


def _parse(data: bytes) -> pb.ProcessingRequest:
    """A message that is not a streamed chunk's, parsed; one that is no ProcessingRequest ends
    its stream with INVALID_ARGUMENT (Envoy fails open)."""
    try:
        return _PARSE(data)
    except DecodeError:
        raise BadStream(Status.INVALID_ARGUMENT, "not an ext_proc ProcessingRequest") from None


_body_only = response_body_only


# One line per malformed stream at most every 10 s (a client can send them at will).
bad_stream_log = RateLimited(log)


def _plain_metadata(headers: Any) -> Any:
    """The gRPC metadata of a request grpclib's request handler would accept as it is (POST,
    gRPC content type of the proto codec, ``te: trailers``) and that has no deadline
    (``grpc-timeout``: grpclib enforces it in the stream's task), read-only, else None: such a
    stream gets grpclib's task, which answers or enforces them as before."""
    method = content_type = te = None
    for name, value in headers:
        if name == ":method":
            method = value
        elif name == "content-type":
            content_type = value
        elif name == "te":
            te = value
        elif name == "grpc-timeout":
            return None
    if method != "POST" or te != "trailers" or content_type not in ("application/grpc", "application/grpc+proto"):
        return None
    return MultiDictProxy(decode_metadata(headers))


class _Exchange:
    """One ext_proc stream, handled where its frames arrive: opened (``Processor.open_stream``)
    as its HEADERS are received, each message answered as its DATA frame is received (the first
    reply behind the constant response headers), and closed (``Processor.close_stream``, the call
    reported) where Envoy's RST_STREAM is received, or, in observability mode (the sidecar ends
    the stream), where its last message is handled: its trailers (``grpc-status: 0``) go out as a
    constant HPACK block (``h2compat.send_trailers_now``) and the stream is closed there. No task,
    no wake-up, no cancellation for the common exchange.

    What needs awaiting hands the stream to a task (``to_task``: grpclib's request handler,
    which calls ``handle`` with the stream where it was left): a reply that the flow-control
    windows, a paused transport or a pending HPACK table size update hold back, the trailers
    when one of the last two does, a bad message (its status).
    Streams whose headers need grpclib's checks (a ``grpc-timeout``, anything unusual) start in a
    task as before."""

    __slots__ = (
        "owner",
        "handler",
        "ps",
        "headers",
        "release",
        "s",
        "buf",
        "handle_message",
        "handle_chunk",
        "held",
        "end",
        "headers_sent",
        "tasked",
        "capped",
        "done",
    )

    def __init__(
        self,
        owner: _Exchanges,
        handler: _Handler | None,
        ps: Any,
        headers: Any,
        release: Callable[[], Any] | None,
        s: Any,
        buf: MessageBuffer,
    ) -> None:
        self.owner = owner
        self.handler = handler
        self.ps = ps  # grpclib's transport-level stream
        self.headers = headers
        self.release = release
        self.s = s  # the Processor's Stream
        self.buf = buf
        self.handle_message = s.handle
        self.handle_chunk = s.handle_body_chunk
        self.held: bytes | None = None  # a reply for the task to send
        self.end = False
        self.headers_sent = False
        self.tasked = handler is None
        self.capped = False  # holds a StreamCap slot of its own (taken without a task)
        self.done = False

    def one(self, data: bytes) -> bool:
        """One message: handled and answered now (True), or left to the task (False). A
        streamed chunk's message (a response body and nothing else, or Envoy's forwarded
        ``metadata_context`` after it once the call holds the one forwarded first) is handled
        from its bytes. A stream in observability mode is handed to ``one_observed`` once a
        message of it got no reply (its first, from Envoy); a reply is always built in the
        default mode, so the mode is not read there."""
        body = _body_only(data, self.s.call.forwarded is not None)
        if body is not None:
            reply = self.handle_chunk(body)
        else:
            reply = self.handle_message(_parse(data))
            if reply is None and self.s.observe_only:
                self.buf.inline = self.one_observed  # the next messages (``close`` may still clear it)
        return self.answer(reply)

    def one_observed(self, data: bytes) -> bool:
        """``one`` for a stream in observability mode (``Stream.observe_only``), from the
        message after its first without a reply. Every message in this mode carries
        ``observability_mode`` (Envoy's last two bytes, ``50 01``), so a streamed chunk's is
        read from its bytes with the flag (``wire.response_body_only`` with ``observed``) and
        handled by ``Stream.handle_body_chunk``, its reply dropped: ``Stream.handle`` of that
        message leaves the same state and returns none (Envoy expects none in this mode). Any
        other message is parsed and handled by ``Stream.handle``."""
        s = self.s
        body = _body_only(data, s.call.forwarded is not None, True)
        if body is not None:
            self.handle_chunk(body)  # (its reply dropped: see above)
            reply = None
        else:
            reply = self.handle_message(_parse(data))
        if reply is None and not s.end_stream:  # (Envoy expects no reply in this mode)
            return True
        return self.answer(reply)

    def answer(self, reply: bytes | None) -> bool:
        """After a message was handled: its reply sent now (True), or held for the task
        (False); and the stream ended by the sidecar if it is over (observability mode:
        ``Stream.end_stream``)."""
        if reply is not None:
            ps = self.ps
            if not self.headers_sent:  # the response headers go first: a constant HPACK block
                if not _send_headers_now(ps):
                    self.held = reply
                    return False
                self.headers_sent = True
            if not _send_now(ps, reply):
                self.held = reply
                return False
        if self.s.end_stream:  # the sidecar ends the stream (observability mode)
            if not self.tasked and _send_trailers_now(self.ps):  # a constant HPACK block
                self.close()  # reported here; ``close`` cleared the buffer's hand-over
            else:
                self.end = True  # the task's handler returns; grpclib sends the trailers
            return False
        return True

    def to_task(self) -> None:
        """``MessageBuffer.handover``: what comes next needs awaiting."""
        handler = self.handler
        assert handler is not None and self.release is not None
        if h2compat.closed(self.ps):  # reset in the read that brought the message: nothing to send
            self.close()
            return
        self.tasked = True
        handler.untasked.discard(self)
        task = handler.start_task(self.ps, self.headers, self.release, None)
        task.add_done_callback(self._task_done)  # a task cancelled before it ran never runs ``handle``

    def _task_done(self, _task: asyncio.Task[Any]) -> None:
        self.close()

    def close(self) -> None:
        """The stream is over (reset, handled to its end, its connection gone, the drain's grace
        expired): the call is reported, once."""
        if self.done:
            return
        self.done = True
        buf = self.buf
        buf.inline = buf.handover = None
        owner = self.owner
        exchanges = owner.server.exchanges
        exchanges.pop(self.ps, None)
        if self.capped:
            owner.cap.released()
        if not self.tasked:  # grpclib's request handler releases a stream it handled
            assert self.handler is not None and self.release is not None
            self.handler.untasked.discard(self)
            self.release()
        owner.close_stream(self.s)
        idle = owner.server.idle
        if not exchanges and idle is not None and not idle.done():
            idle.set_result(None)


_send_now = h2compat.send_message_now
_header_block = h2compat.header_block
_NOT_DERIVED = h2compat.NOT_DERIVED
_send_headers_now = h2compat.send_response_headers_now
_send_trailers_now = h2compat.send_trailers_now


class _Exchanges:
    """What a server's ext_proc streams share: the Processor, the stream cap, the server."""

    __slots__ = ("server", "cap", "open_stream", "close_stream")

    def __init__(self, server: GrpclibServer, processor: Processor, cap: StreamCap) -> None:
        self.server = server
        self.cap = cap
        self.open_stream = processor.open_stream
        self.close_stream = processor.close_stream

    def start(self, handler: _Handler, ps: Any, headers: Any, release: Callable[[], Any]) -> bool:
        """``GrpclibServer.untasked``: take a new ext_proc stream without a task, if its headers
        allow (see ``_plain_metadata``) and the worker keeps up (``StreamCap.behind``).

        The stream's metadata is decoded once per kept header block: Envoy opens each ext_proc
        stream after a connection's first two with the same block, which h2compat keeps decoded
        (``cache_header_blocks``), and the block's first stream keeps its metadata on it
        (``h2compat.header_block``), a read-only proxy which ``Processor.open_stream`` only
        reads. A stream h2 opened (a connection's first two, a block not kept) decodes its own,
        kept by nothing once the stream ends: a few streams per connection, and no table of past
        header lists whose keys a client chooses."""
        if self.cap.behind():  # a worker that falls behind gives new streams tasks, which count as waiting
            return False
        block = _header_block(ps)
        if block is None:  # opened by h2
            metadata = _plain_metadata(headers)
        else:  # opened from a kept header block: ``headers`` are its request headers
            metadata = block.derived
            if metadata is _NOT_DERIVED:
                metadata = block.derived = _plain_metadata(headers)
        if metadata is None:
            return False
        buf: MessageBuffer = ps.buffer
        exchange = _Exchange(self, handler, ps, headers, release, self.open_stream(metadata), buf)
        exchange.capped = True
        self.cap.taken()
        handler.untasked.add(exchange)
        self.server.exchanges[ps] = exchange
        buf.inline = exchange.one
        buf.handover = exchange.to_task
        return True


def build_server(processor: Processor, address: str, tls: TlsConfig | None = None) -> GrpclibServer:
    """The ext_proc server on ``address``: TLS/mTLS when ``tls`` is enabled, else plaintext."""
    server = GrpclibServer(address, tls)
    counters = processor.counters

    def max_message() -> int:
        return processor.settings.limits.max_grpc_message_bytes  # read per message: a reload applies at once

    def on_large(size: int) -> None:
        counters.large += size  # freed when the stream ends: worth a malloc_trim
        counters.large_seen()

    cap = server.cap = StreamCap(
        PROCESS, lambda: processor.settings.limits.max_streams, lambda: processor.settings.limits.max_waiting_streams, processor.refuse
    )
    started = cap.started
    current_task = asyncio.current_task
    shared = _Exchanges(server, processor, cap)
    server.buffers[PROCESS] = lambda ack: MessageBuffer(ack, max_message, on_large, MIN_GRPC_MESSAGE_BYTES)
    server.untasked[PROCESS] = shared.start
    exchanges = server.exchanges

    async def handle(stream: Stream) -> None:
        """An ext_proc stream in a task: one handed over by its ``_Exchange`` (``to_task``), or
        one whose headers needed grpclib's request handler from the start. While this task
        waits, the messages that arrive are still handled where their frames are received (see
        ``MessageBuffer.inline``); ``_Exchange.one`` hands back to the task what needs awaiting."""
        ps = h2compat.h2_stream(stream)
        exchange = exchanges.get(ps)
        if exchange is None:
            started(current_task())
            exchange = _Exchange(shared, None, ps, None, None, shared.open_stream(stream.metadata), ps.buffer)
        elif exchange.headers_sent:
            h2compat.initial_metadata_sent(stream)
        buf = exchange.buf
        send = stream.send_message
        one = buf.inline = exchange.one_observed if exchange.s.observe_only else exchange.one
        try:
            buf.check()  # what went wrong before the hand-over (a bad message)
            while True:
                if exchange.held is not None:
                    reply, exchange.held = exchange.held, None
                    await send(reply)
                    exchange.headers_sent = True
                if exchange.end:
                    return
                data = buf.next_message()
                if data is not None:
                    one(data)
                elif buf.ended:
                    return
                else:
                    await buf.wait()
        except BadStream as e:  # the client gets the status, the log one line
            counters.bad_streams += 1
            bad_stream_log.warning("malformed ext_proc stream", reason=e.reason)
            raise GRPCError(e.status, e.reason) from None
        finally:  # however the stream ended (cancelled when Envoy reset it): reported once
            exchange.close()

    server.add_method(PROCESS, handle, Cardinality.STREAM_STREAM, pb.ProcessingRequest, bytes, drain_waits=True)
    return server


def health_only_server(address: str) -> GrpclibServer:
    """A server for ``healthListen``: the health service only (add it with :class:`Health`)."""
    return GrpclibServer(address)


__all__ = ("GrpclibServer", "StreamCap", "build_server", "health_only_server")
