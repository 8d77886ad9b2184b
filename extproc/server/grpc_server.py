"""The gRPC server: ext_proc and ``grpc.health.v1`` on grpclib (plain asyncio and ``h2``).

No C core, no poller thread and no cross-thread wake-up per message: the event loop reads Envoy's
frames; an ext_proc message that arrives while its stream's task waits is answered right there
(``MessageBuffer.inline``), the rest by the stream's task; and everything a connection has to send
leaves in one ``write`` per read or loop iteration (see ``_CoalescingTransport``). Servers have
``start()`` and ``stop(grace)``; :mod:`extproc.server.worker` drives them.

grpclib provides the HTTP/2 connection handling (``H2Protocol``) and per-stream request handling
(``Handler`` / ``request_handler``: headers, deadlines, trailers, resets). We add here: the
pass-through codec, the ext_proc streams' receive path (DATA frames past h2's parser into a
:class:`MessageBuffer`), the listener (TCP with SO_REUSEPORT, ``unix:``, TLS), the health service on
``grpc_health``'s messages, and a graceful stop (grpclib's own ``Server.close`` cancels every
stream at once).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.const import Cardinality, Status
from grpclib.const import Handler as MethodHandler
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Handler, Stream
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.config import TlsConfig
from extproc.core.envoy_names import EXT_PROC_METHOD
from extproc.core.logs import RateLimited
from extproc.server import h2compat
from extproc.server.message_buffer import BadStream, MessageBuffer
from extproc.server.processor import Processor
from extproc.server.tls import ssl_context, warn_if_plaintext

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
    handed to the socket once, at the next iteration, or at the end of the read that made them
    (``_Protocol.data_received`` flushes)."""

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
            h2compat.use_buffer(stream, buffer(partial(stream.connection.ack, stream.id)))
        super().accept(stream, headers, release_stream)
        task = h2compat.forget_when_done(self, stream)
        if cap is not None:
            cap.opened(task)

    def cancel(self, stream: Any) -> None:
        h2compat.cancel_stream(self, stream)


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
    never runs its own ``finally``)."""

    WAIT_GRACE = 0.05  # seconds

    def __init__(self, path: str, max_open: Callable[[], int], max_waiting: Callable[[], int],
                 on_refused: Callable[[str], None]) -> None:
        self.path = path
        self.max_open = max_open
        self.max_waiting = max_waiting
        self.on_refused = on_refused
        self.open = 0
        # accept time of each stream not started yet, oldest first (dicts keep insertion order)
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self._clock = time.monotonic

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
        self.connection.flush()
        if self._owner.draining:
            self.goaway()

    def _stream_reset(self, event: h2compat.StreamReset) -> None:
        """Envoy resets (RST_STREAM) most ext_proc streams when its filter is done with them, so
        this is the common way a stream ends. grpclib would also hand the stream's task a
        ``StreamTerminatedError`` kept on its ``Wrapper``: a reference cycle through the
        traceback's frames per stream, i.e. cyclic garbage that made full GC passes of 100-200 ms
        under load. Cancelling the task is enough (the Processor's ``finally`` reports the call)."""
        stream = h2compat.stream_of(self, event.stream_id)
        if stream is not None:
            self.handler.cancel(stream)
        self.connection.streams_failed += 1

    def data_received(self, data: bytes) -> None:
        # The DATA frames of ext_proc messages on open streams go straight to their streams; h2
        # gets whatever else there is (see h2compat.receive_data_frames).
        taken = h2compat.receive_data_frames(self, data)
        if taken < len(data):
            super().data_received(data[taken:] if taken else data)
        # what handling this read produced (replies made inline, window updates) leaves now, in
        # one write: no further event-loop iteration per streamed chunk
        self._out.flush()

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
    client_side=False, header_encoding="ascii", validate_inbound_headers=False, validate_outbound_headers=False,
    normalize_inbound_headers=False, normalize_outbound_headers=False,
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

    def add_method(self, path: str, func: Callable[[Stream], Any], cardinality: Cardinality,
                   request_type: Any, reply_type: Any, *, drain_waits: bool = False) -> None:
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
                self._server = await loop.create_server(self._protocol_factory, host.strip("[]") or None, int(port),
                                                        reuse_address=True, reuse_port=True, ssl=self._ssl)
        except OSError as e:
            raise OSError(f"cannot listen on {self.address}: {e.strerror or e}") from None

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
        if grace and self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)
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


# One line per malformed stream at most every 10 s (a client can send them at will).
bad_stream_log = RateLimited(log)


def build_server(processor: Processor, address: str, tls: TlsConfig | None = None) -> GrpclibServer:
    """The ext_proc server on ``address``: TLS/mTLS when ``tls`` is enabled, else plaintext."""
    server = GrpclibServer(address, tls)
    send_now = h2compat.send_message_now
    send_headers_now = h2compat.send_response_headers_now

    counters = processor.counters

    def max_message() -> int:
        return processor.settings.limits.max_grpc_message_bytes  # read per message: a reload applies at once

    def on_large(size: int) -> None:
        counters.large += size  # freed when the stream ends: worth a malloc_trim

    cap = server.cap = StreamCap(PROCESS, lambda: processor.settings.limits.max_streams,
                                 lambda: processor.settings.limits.max_waiting_streams, processor.refuse)
    started = cap.started
    current_task = asyncio.current_task
    open_stream, close_stream = processor.open_stream, processor.close_stream
    server.buffers[PROCESS] = lambda ack: MessageBuffer(ack, max_message, on_large)

    async def handle(stream: Stream) -> None:
        """One ext_proc stream, message by message (``Processor.open_stream``, ``Stream.handle``,
        ``Processor.close_stream``). While this task waits, the messages that arrive are
        handled by ``one`` where their frames are received (see ``MessageBuffer.inline``). The
        first reply goes out behind the response headers, a constant HPACK block
        (``h2compat.send_response_headers_now``). ``one`` hands back to the task what needs
        awaiting: a reply the flow-control windows (or a paused transport, or a pending HPACK
        table size update) hold back, the end of the stream."""
        started(current_task())
        buf: MessageBuffer = h2compat.h2_stream(stream).buffer
        s = open_stream(stream.metadata)
        handle_message = s.handle
        send = stream.send_message
        first = True
        held: bytes | None = None  # a reply for the task to send
        end = False

        def one(data: bytes) -> bool:
            nonlocal held, end, first
            try:
                req = _PARSE(data)
            except DecodeError:
                raise BadStream(Status.INVALID_ARGUMENT, "not an ext_proc ProcessingRequest") from None
            reply = handle_message(req)
            if reply is not None:
                if first:  # the response headers go first: a constant HPACK block
                    if not send_headers_now(stream):
                        held = reply
                        return False
                    first = False
                if not send_now(stream, reply):
                    held = reply
                    return False
            if s.end_stream:
                end = True
                return False
            return True

        buf.inline = one
        try:
            while True:
                if held is not None:
                    reply, held = held, None
                    await send(reply)
                    first = False
                if end:
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
            buf.inline = None
            close_stream(s)

    server.add_method(PROCESS, handle, Cardinality.STREAM_STREAM, pb.ProcessingRequest, bytes, drain_waits=True)
    return server


def health_only_server(address: str) -> GrpclibServer:
    """A server for ``healthListen``: the health service only (add it with :class:`Health`)."""
    return GrpclibServer(address)


__all__ = ("GrpclibServer", "StreamCap", "build_server", "health_only_server")
