"""Every private grpclib / h2 / hpack / hyperframe detail the server relies on, in one place.

grpclib has no public hooks for what :mod:`extproc.server.grpc_server` needs (a graceful stop that
keeps streams in flight, cheap stream resets, a bounded memory of closed streams, the ext_proc
streams' frames taken past h2's parser, an HPACK decode cache), so the server reaches into a few
internals. Each one is a function (or class) here, and ``tests/unit/test_h2compat.py`` checks
every assumption against the installed versions (pinned in pyproject: grpclib, h2, hpack,
hyperframe), so an upgrade that breaks one fails a named test instead of a stream in production.

The receive path (:func:`receive_frames`, :func:`frame_end`, driven by the server's
``_Protocol.data_received``) walks a read frame by frame: what it takes past h2 leaves h2's and
grpclib's state as h2 would, and every other whole frame is h2's alone, in order. One difference
is by design: h2 parses a whole read before grpclib handles its events, so a protocol error in a
read drops the events of the frames before it in the same read (the connection is closed
anyway); here those frames have been handled, as h2 does when each comes in a read of its own.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import functools
import struct
import time
from collections.abc import Callable
from typing import Any

import h2.connection
from grpclib.config import Configuration
from grpclib.events import _DispatchServerEvents
from grpclib.protocol import Buffer, H2Protocol, Stream
from grpclib.server import Handler
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import StreamReset
from h2.settings import SettingCodes
from h2.stream import H2Stream, H2StreamStateMachine, StreamClosedBy, StreamInputs, StreamState
from h2.utilities import SizeLimitDict
from h2.windows import WindowManager
from hpack import Decoder
from hpack.table import HeaderTable, table_entry_size
from hyperframe.frame import GoAwayFrame

__all__ = (
    "NOT_DERIVED",
    "acknowledger",
    "cache_header_blocks",
    "cancel_stream",
    "cancelled_tasks",
    "forget_when_done",
    "h2_connection",
    "h2_stream",
    "header_block",
    "lazy_frame_repr",
    "limit_closed_streams",
    "on_stream_reset",
    "failed",
    "frame_end",
    "receive_frames",
    "send_goaway",
    "closed",
    "initial_metadata_sent",
    "response_headers_sent",
    "send_message_now",
    "send_response_headers_now",
    "send_trailers_now",
    "server_configuration",
    "server_events",
    "stream_of",
    "use_buffer",
)


def server_configuration() -> Any:
    """grpclib's server-side defaults (``Server.__init__`` builds the same)."""
    return Configuration().__for_server__()


def server_events() -> Any:
    """grpclib's event dispatcher for servers (no listeners: we register none)."""
    return _DispatchServerEvents()


def h2_connection(protocol: H2Protocol) -> H2Connection:
    """The h2 state machine behind a grpclib connection."""
    return protocol.connection._connection


def h2_stream(stream: Any) -> Any:
    """The transport-level stream (``grpclib.protocol.Stream``) behind a server ``Stream``: its
    ``buffer`` is what :func:`use_buffer` set, for an ext_proc stream its ``MessageBuffer``."""
    return stream._stream


def use_buffer(stream: Any, buffer: Any) -> None:
    """Give a stream just accepted (nothing of its body received yet) another receive buffer:
    grpclib calls ``add(data, ack_size)`` per DATA frame, ``eof()`` at END_STREAM and, when the
    stream is released, acknowledges ``unacked_size()``."""
    stream.buffer = buffer


_ACK_OPEN = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)  # h2's ``H2Stream.open``


def acknowledger(stream: Any) -> Callable[[int], None]:
    """What grpclib's ``Connection.ack`` does for the transport-level ``stream`` (h2's
    ``acknowledge_received_data``, then a write of what h2 queued), as a function of the size,
    for the stream's receive buffer to call per message it takes.

    h2 hands processed bytes back to the peer only in batches (a WINDOW_UPDATE once half a
    window was processed, see ``h2.windows.WindowManager``); between them an acknowledgment only
    counts the bytes on the connection's and the stream's window managers. That common case is
    done here, exactly as h2 counts it; whenever either window would be due an update, the stream
    is not open, or h2 has bytes queued to send, h2 and grpclib do it all as before."""
    connection = stream.connection
    conn: H2Connection = connection._connection
    stream_id = stream.id
    slow = connection.ack  # no partial per stream: called with the id in the rare case
    conn_window = conn._inbound_flow_control_window_manager
    streams = conn.streams

    def ack(size: int) -> None:
        h2s = streams.get(stream_id)
        if h2s is not None and not conn._data_to_send and h2s.state_machine.state in _ACK_OPEN:
            # For each window: would h2's ``WindowManager.process_bytes(size)`` only count the
            # bytes? (the negation of its ``_maybe_update_window`` condition; ``size`` > 0)
            window = h2s._inbound_window_manager
            processed = conn_window._bytes_processed + size
            limit = conn_window.max_window_size
            if processed < limit // 2 and (conn_window.current_window_size != 0 or processed <= min(1024, limit // 4)):
                stream_processed = window._bytes_processed + size
                limit = window.max_window_size
                if stream_processed < limit // 2 and (window.current_window_size != 0 or stream_processed <= min(1024, limit // 4)):
                    conn_window._bytes_processed = processed
                    window._bytes_processed = stream_processed
                    return
        slow(stream_id, size)

    return ack


def limit_closed_streams(protocol: H2Protocol, kept: int) -> bool:
    """h2 remembers how each of a connection's last 65,536 closed streams ended (~115 B each);
    keep ``kept`` instead. False if this h2 has no such table (nothing to limit)."""
    closed = getattr(h2_connection(protocol), "_closed_streams", None)
    if isinstance(closed, SizeLimitDict):
        closed._size_limit = kept
        return True
    return False


class _OnReset:
    """What grpclib's processor calls for h2's ``StreamReset`` event: ``by_id(stream_id)``, which
    :func:`receive_frames` also calls, without an event, for the RST_STREAM it takes."""

    __slots__ = ("by_id",)

    def __init__(self, by_id: Callable[[int], None]) -> None:
        self.by_id = by_id

    def __call__(self, event: StreamReset) -> None:
        self.by_id(event.stream_id)


def on_stream_reset(protocol: H2Protocol, callback: Callable[[int], None]) -> None:
    """Handle a stream's reset (the client's RST_STREAM, or h2 resetting it for a stream error)
    ourselves instead of grpclib's processor: ``callback(stream_id)``."""
    protocol.processor.processors[StreamReset] = _OnReset(callback)  # type: ignore[assignment]


def _reset_callback(protocol: H2Protocol) -> Callable[[int], None] | None:
    """The ``callback`` :func:`on_stream_reset` registered, if grpclib's processor still has it."""
    handler = getattr(protocol.processor, "processors", {}).get(StreamReset)
    return handler.by_id if handler.__class__ is _OnReset else None


def stream_of(protocol: H2Protocol, stream_id: int) -> Any:
    """grpclib's stream object for an h2 stream id, or None."""
    return protocol.processor.streams.get(stream_id)


def send_goaway(protocol: H2Protocol) -> None:
    """GOAWAY(NO_ERROR, last stream = the highest the client opened): the client opens no more
    streams here, the ones it has keep working. (h2's ``close_connection`` would also stop us
    sending on them, so the frame is built and written directly.)"""
    frame = GoAwayFrame(0)
    frame.last_stream_id = h2_connection(protocol).highest_inbound_stream_id
    frame.error_code = ErrorCodes.NO_ERROR
    protocol.connection._transport.write(frame.serialize())


def cancelled_tasks(handler: Handler) -> list[asyncio.Task[Any]]:
    """Stream tasks a handler cancelled in ``close()`` that have not finished unwinding."""
    return [t for t in handler._cancelled if not t.done()]


_DATA_HEAD = struct.Struct(">HBBBLBL")  # DATA frame header (length: 16 + 8 bits, type 0, flags 0, stream) + gRPC prefix
_SENDABLE = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


def send_message_now(ps: Any, message: bytes) -> bool:
    """Send one serialised gRPC message on a stream (grpclib's transport-level ``Stream``,
    :func:`h2_stream`) whose response headers went out,
    as a single DATA frame written at once, if h2 would accept it right now: connection and stream
    open for sending, both flow-control windows and the peer's maximum frame size large enough,
    the transport not paused. Returns False, having done nothing, otherwise (the caller then uses
    grpclib's ``send_message``, which waits for the window or raises as usual).

    This is what grpclib's ``send_message`` -> ``send_data`` -> h2's ``send_data`` amount to for
    a message that fits (h2 keeps no other state for an outgoing DATA frame: the transitions are
    state-preserving and have no side effects), without their per-message coroutines, frame
    objects and checks: h2's windows are debited exactly as h2 does it."""
    conn: H2Connection = ps._h2_connection
    h2s = conn.streams.get(ps.id)
    size = len(message) + 5
    if (
        h2s is None
        or h2s.state_machine.state not in _SENDABLE
        or conn.state_machine.state is not ConnectionState.SERVER_OPEN
        or size > conn.outbound_flow_control_window
        or size > h2s.outbound_flow_control_window
        or size > conn.max_outbound_frame_size
        or not ps.connection.write_ready._value  # asyncio's ``Event.is_set()``, without the call
    ):
        return False
    h2s.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    pending = conn.data_to_send() if conn._data_to_send else b""
    ps._transport.write(pending + _DATA_HEAD.pack(size >> 8, size & 0xFF, 0, 0, ps.id, 0, len(message)) + message)
    return True


_FRAME_HEAD = struct.Struct(">HBBBL")  # length (16 + 8 bits), type, flags, R + stream id

RESPONSE_CONTENT_TYPE = "application/grpc+proto"  # grpclib's ``Stream._content_type`` with a "proto" codec


def _response_headers_block(content_type: str) -> bytes:
    """HPACK for ``:status: 200`` (static table entry 8) and ``content-type`` (literal value, name
    from static entry 31, *without indexing*): a block that reads and changes no dynamic table,
    so it is the same bytes on every stream of every connection (RFC 7541 6.1, 6.2.2)."""
    value = content_type.encode("ascii")
    assert len(value) < 127  # a one-byte string length (7-bit prefix), no Huffman coding
    return b"\x88" + b"\x0f\x10" + bytes([len(value)]) + value


RESPONSE_HEADERS_BLOCK = _response_headers_block(RESPONSE_CONTENT_TYPE)
_HEADERS_END = 0x4  # END_HEADERS


def send_response_headers_now(ps: Any) -> bool:
    """Send a stream's response headers (grpclib's ``send_initial_metadata`` with no
    metadata: ``:status: 200``, ``content-type``) as one HEADERS frame of the constant
    :data:`RESPONSE_HEADERS_BLOCK`, written at once, if h2 would send headers on it right now:
    the headers not sent yet, stream and connection open for sending, the peer's maximum frame
    size large enough, no HPACK table size update pending (it must open the next header block),
    the transport not paused. Returns False, having done nothing, otherwise (the caller then uses
    grpclib's ``send_message``, which sends the headers through h2 as usual).

    This is what ``send_initial_metadata`` -> ``send_headers`` -> h2's ``send_headers`` amount to
    for these two headers, without their coroutines, header lists, validation, frame objects and
    HPACK encoding per stream: the stream's state machine takes the same SEND_HEADERS input (so
    trailers later are trailers), the connection's SEND_HEADERS input in SERVER_OPEN changes
    nothing, and the encoder's dynamic table is untouched (the block indexes nothing), so the
    trailers h2 encodes later read right."""
    conn: H2Connection = ps._h2_connection
    h2s = conn.streams.get(ps.id)
    if h2s is None or h2s.state_machine.headers_sent or not _headers_sendable(ps, conn, h2s, len(RESPONSE_HEADERS_BLOCK)):
        return False
    h2s.state_machine.process_input(StreamInputs.SEND_HEADERS)
    _write_headers(ps, conn, RESPONSE_HEADERS_BLOCK, _HEADERS_END)
    return True


def _headers_sendable(ps: Any, conn: H2Connection, h2s: Any, size: int) -> bool:
    """Whether h2 would send a HEADERS frame of a ``size``-byte block on the stream right now:
    stream and connection open for sending, the peer's maximum frame size large enough, no
    HPACK table size update pending (it must open the next header block), the transport not
    paused (grpclib's ``write_ready``)."""
    return (
        h2s.state_machine.state in _SENDABLE
        and conn.state_machine.state is ConnectionState.SERVER_OPEN
        and not conn.encoder.header_table.resized
        and size <= conn.max_outbound_frame_size
        and ps.connection.write_ready.is_set()
    )


def _write_headers(ps: Any, conn: H2Connection, block: bytes, flags: int) -> None:
    """One HEADERS frame of ``block`` with ``flags``, written behind what h2 has queued (frame
    order kept), then grpclib's count of headers sent, as its ``send_headers`` does."""
    pending = conn.data_to_send() if conn._data_to_send else b""
    ps._transport.write(pending + _FRAME_HEAD.pack(0, len(block), 1, flags, ps.id) + block)
    ps.connection.headers_send_process()


# grpclib's trailers for status OK and no trailing metadata (``send_trailing_metadata``):
# ``grpc-status: 0``, a literal *without indexing* with a literal name (RFC 7541 6.2.2), so,
# like :data:`RESPONSE_HEADERS_BLOCK`, the same bytes on every stream, the encoder's dynamic
# table untouched. Behind the response headers when none went out yet ("trailers-only", what
# grpclib sends then: ``:status``, ``content-type``, ``grpc-status`` in one block).
TRAILERS_OK_BLOCK = b"\x00\x0bgrpc-status\x010"
TRAILERS_ONLY_OK_BLOCK = RESPONSE_HEADERS_BLOCK + TRAILERS_OK_BLOCK
_HEADERS_END_STREAM = 0x1 | _HEADERS_END  # END_STREAM | END_HEADERS


def send_trailers_now(ps: Any) -> bool:
    """End a stream with status OK (what grpclib's request handler does when the method's handler
    returns: ``send_trailing_metadata`` -> ``send_headers(..., end_stream=True)``): one HEADERS
    frame with END_STREAM of the constant :data:`TRAILERS_OK_BLOCK`, or
    :data:`TRAILERS_ONLY_OK_BLOCK` if h2 has sent no response headers on the stream, written at
    once, if h2 would send them right now: trailers not sent yet, stream and connection open for
    sending, the peer's maximum frame size large enough, no HPACK table size update pending, the
    transport not paused. Returns False, having done nothing, otherwise (the caller then leaves
    the stream's end to grpclib's request handler, which sends the trailers through h2 or finds
    the stream gone, as usual).

    The stream's state machine takes the inputs h2's ``send_headers`` gives it (SEND_HEADERS:
    the response headers or the trailers sent; SEND_END_STREAM: half closed, or closed by our
    END_STREAM if Envoy had ended its side), the connection's SEND_HEADERS in SERVER_OPEN
    changes nothing, no frame objects, header lists or HPACK encoding per stream."""
    conn: H2Connection = ps._h2_connection
    h2s = conn.streams.get(ps.id)
    if h2s is None or h2s.state_machine.trailers_sent or not _headers_sendable(ps, conn, h2s, len(TRAILERS_ONLY_OK_BLOCK)):
        return False
    machine = h2s.state_machine
    block = TRAILERS_OK_BLOCK if machine.headers_sent else TRAILERS_ONLY_OK_BLOCK
    machine.process_input(StreamInputs.SEND_HEADERS)
    machine.process_input(StreamInputs.SEND_END_STREAM)
    _write_headers(ps, conn, block, _HEADERS_END_STREAM)
    return True


def initial_metadata_sent(stream: Any) -> None:
    """Tell a server ``Stream`` its response headers went out (:func:`send_response_headers_now`),
    so its ``send_message`` sends none and its trailers are trailers."""
    stream._send_initial_metadata_done = True


def response_headers_sent(ps: Any) -> bool:
    """Whether h2 knows the stream's response headers were sent."""
    h2s = ps._h2_connection.streams.get(ps.id)
    return h2s is not None and h2s.state_machine.headers_sent


def closed(ps: Any) -> bool:
    """Whether h2 has closed the stream (reset by either side, or ended both ways)."""
    h2s = ps._h2_connection.streams.get(ps.id)
    return h2s is None or h2s.state_machine.state is StreamState.CLOSED


_RECEIVABLE = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)


def receive_frames(protocol: H2Protocol, data: bytes, offset: int = 0) -> int:
    """Take the frames of ext_proc streams at ``data[offset:]`` past h2's frame parser and event
    objects, and return where the first frame not taken starts (``offset`` if none was):

    - a plain DATA frame (what Envoy sends for each ext_proc message on an open stream) goes
      straight into grpclib's stream buffer;
    - a HEADERS frame opening a new stream (what Envoy sends for each ext_proc stream) whose
      header block h2's decoder has cached (:class:`_CachingDecoder`) and can take as a
      request's headers (:class:`_Block`) opens the stream as h2 would, and grpclib's processor
      handles the ``RequestReceived`` (the handler's ``accept``) as usual;
    - a RST_STREAM on a stream h2 has open (what Envoy sends to end each ext_proc stream) closes
      it as h2 would and goes to the handler :func:`on_stream_reset` registered, see
      :func:`_reset_stream`.

    The rest (from the first frame that is anything else: another type or other flags, an
    unknown, closing or already used stream id (a reset of an idle, closed or unknown stream, or
    of stream 0), a RST_STREAM of another length, a header block not cached, a frame that
    overdraws a flow-control window or is incomplete) is for h2's ``receive_data``, which then
    handles it, and its errors, exactly as before. Nothing is taken while h2 holds bytes of its
    own (a partial frame, the preface, a header block awaiting CONTINUATION) or the connection
    is not open: frames keep their order.

    For each DATA frame taken this does what h2's ``_receive_data_frame`` ->
    ``H2Stream.receive_data`` and grpclib's ``process_data_received`` do for it: the
    connection's RECV_DATA input in SERVER_OPEN and the stream's in OPEN / HALF_CLOSED_LOCAL keep
    their states and only make the ``DataReceived`` event; both inbound windows are debited; the
    stream's received length is counted (a stream with a content-length header is left to h2);
    the payload goes into the stream's buffer with its flow-controlled length (acknowledged when
    the handler reads it). For a HEADERS frame, see :func:`_open_stream`."""
    conn: H2Connection = protocol.connection._connection
    incoming = conn.incoming_buffer
    if incoming._data or incoming._headers_buffer or incoming._preamble_len or conn.state_machine.state is not ConnectionState.SERVER_OPEN:
        return offset
    streams = conn.streams
    grpc_streams = protocol.processor.streams
    window = conn._inbound_flow_control_window_manager
    max_size = conn.max_inbound_frame_size
    cached: Any = False  # the decoder's ``cached``, looked up at the first HEADERS frame
    unpack = _FRAME_HEAD.unpack_from
    on_reset: Callable[[int], None] | None = None
    end = len(data)
    taken = 0
    while offset + 9 <= end:
        high, low, kind, flags, stream_id = unpack(data, offset)
        size = (high << 8) | low
        start = offset + 9
        if start + size > end or size > max_size:
            break
        if kind == 1:  # HEADERS
            stream_id &= 0x7FFFFFFF
            if cached is False:
                cached = getattr(conn.decoder, "cached", None)
            if (
                flags != _HEADERS_END
                or not stream_id & 1
                or stream_id <= conn.highest_inbound_stream_id
                or cached is None
                or conn.state_machine.state is not ConnectionState.SERVER_OPEN
            ):
                break
            block = cached(data[start : start + size])
            # h2's check of the streams open (which also forgets the closed ones) comes first
            if block is None or not block.plain or _open_inbound_streams(conn) >= _max_concurrent_streams(conn):
                break
            config: Any = conn.config  # (its two options read where h2's descriptors keep them)
            if config._validate_inbound_headers or config._normalize_inbound_headers or failed(protocol):
                break
            _open_stream(protocol, conn, stream_id, block, config.header_encoding)
            offset = start + size
            continue
        if kind == 3:  # RST_STREAM
            h2s = streams.get(stream_id & 0x7FFFFFFF)
            if (
                size != 4
                or flags
                or h2s is None
                or h2s.state_machine.state not in _ACK_OPEN
                or conn.state_machine.state is not ConnectionState.SERVER_OPEN
            ):
                break
            if on_reset is None:
                on_reset = _reset_callback(protocol)
                if on_reset is None:
                    break
            _reset_stream(protocol, conn, h2s, on_reset)
            offset = start + size
            continue
        if kind or flags or size > window.current_window_size:
            break
        h2s = streams.get(stream_id & 0x7FFFFFFF)
        stream = grpc_streams.get(stream_id & 0x7FFFFFFF)
        if (
            h2s is None
            or stream is None
            or h2s.state_machine.state not in _RECEIVABLE
            or not h2s.state_machine.headers_received
            or h2s._expected_content_length is not None
            or size > h2s._inbound_window_manager.current_window_size
        ):
            break
        window.current_window_size -= size
        h2s._inbound_window_manager.current_window_size -= size
        h2s._actual_content_length += size
        stream.buffer.add(data[start : start + size], size)
        stream.data_received += size
        taken += size
        offset = start + size
    if taken:
        grpc_conn = protocol.connection
        grpc_conn.data_received += taken
        grpc_conn.last_data_received = time.monotonic()
    return offset


def _open_inbound_streams(conn: H2Connection) -> int:
    """h2's ``open_inbound_streams`` for a server connection (``_open_streams(1)``): the client's
    streams open or half closed, counted while every closed stream is moved from ``streams`` to
    ``_closed_streams`` with how it was closed, in the same order; without its per-stream
    property calls."""
    count = 0
    closed: list[int] | None = None
    for stream_id, stream in conn.streams.items():
        state = stream.state_machine.state
        if state in _ACK_OPEN:
            count += stream_id & 1
        elif state is StreamState.CLOSED:
            if closed is None:
                closed = [stream_id]
            else:
                closed.append(stream_id)
    if closed is not None:
        streams = conn.streams
        kept: Any = conn._closed_streams  # h2's SizeLimitDict (typed as a dict)
        limit = kept._size_limit
        for stream_id in closed:
            # h2's ``SizeLimitDict.__setitem__``, its size check inline: the oldest dropped
            _ODICT_SET(kept, stream_id, streams.pop(stream_id).state_machine.stream_closed_by)
            if limit is not None:
                while len(kept) > limit:
                    kept.popitem(last=False)
    return count


_ODICT_SET = collections.OrderedDict.__setitem__
_MAX_STREAMS = SettingCodes.MAX_CONCURRENT_STREAMS
_INITIAL_WINDOW = SettingCodes.INITIAL_WINDOW_SIZE


def _max_concurrent_streams(conn: H2Connection) -> int:
    """h2's ``local_settings.max_concurrent_streams`` (its value once the client acknowledged
    it, else h2's default), read from the settings' table without the property and mapping
    calls."""
    values = conn.local_settings._settings.get(_MAX_STREAMS)
    value = values[0] if values else None
    return 2**32 + 1 if value is None else value  # type: ignore[no-any-return]


def _initial_window(settings: Any) -> int:
    """h2's ``settings.initial_window_size``, read from the settings' table (h2's property
    itself when the value is not there: it raises as h2 does)."""
    value = settings._settings[_INITIAL_WINDOW][0]
    return settings.initial_window_size if value is None else value  # type: ignore[no-any-return]


def _open_stream(protocol: H2Protocol, conn: H2Connection, stream_id: int, block: _Block, encoding: Any) -> None:
    """What h2's ``_receive_frame`` -> ``_receive_headers_frame`` and grpclib's
    ``H2Protocol.data_received`` do for a HEADERS frame with only END_HEADERS set that opens
    client stream ``stream_id`` (odd, above every id the client used) on an open server
    connection that neither validates nor normalises received headers, its block already
    decoded (``block``: the request's headers as ``H2Stream.receive_headers`` makes them with
    the connection's ``header_encoding``, :meth:`_Block.request_headers`), once the check of the
    streams open passed: the connection's RECV_HEADERS input (no state change, no callback in
    SERVER_OPEN); the new stream as ``_begin_new_stream`` and ``receive_headers`` leave it
    (:func:`_new_h2_stream`: IDLE -> OPEN, received from a client, no content-length), the
    highest stream id; no frame to send; then grpclib's ``process_request_received`` for the
    ``RequestReceived`` event (its stream, a :class:`_ServerStream` that knows its ``block``
    (:func:`header_block`), registered, handed to the handler's ``accept``) without the event,
    h2's output flushed before and after as grpclib does."""
    conn.streams[stream_id] = _new_h2_stream(conn, stream_id)
    conn.highest_inbound_stream_id = stream_id
    grpc_conn = protocol.connection
    if conn._data_to_send:
        grpc_conn.flush()
    processor = protocol.processor
    headers = block.request_headers(encoding)
    stream = _ServerStream(grpc_conn, conn, grpc_conn._transport, stream_id)
    stream.block = block
    processor.handler.accept(stream, headers, _register(processor, grpc_conn, stream, stream_id))
    if conn._data_to_send:
        grpc_conn.flush()


def _register(processor: Any, connection: Any, stream: Any, stream_id: int) -> Callable[[], None]:
    """grpclib's ``EventsProcessor.register``: ``stream`` registered, and its release function,
    which does what grpclib's does (the stream forgotten, the connection's close waiter set, the
    bytes its buffer took but did not acknowledge handed back) but asks whether the connection
    is closing only when there are such bytes (acknowledging none does nothing)."""
    streams = processor.streams
    streams[stream_id] = stream

    def release_stream() -> None:
        released = streams.pop(stream_id)
        connection.stream_close_waiter.set()
        size = released.buffer.unacked_size()
        if size and not connection.is_closing():
            connection.ack(stream_id, size)

    return release_stream


class _OnFirstUse:
    """An attribute made by ``make(obj)`` when first read, then an ordinary instance attribute."""

    __slots__ = ("make", "name")

    def __init__(self, make: Callable[[Any], Any]) -> None:
        self.make = make
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.make(obj)
        return value


class _ServerStream(Stream):
    """grpclib's transport-level ``Stream`` of a client's stream, as ``Connection.create_stream``
    makes it for ``process_request_received``, but for its asyncio objects, made when first read
    (each as grpclib makes it, so their first use is the same): the ``window_updated``,
    ``headers_received`` and ``trailers_received`` events (waited for only by a task sending
    into a full window, or on a client), and the receive ``buffer`` (a ``Buffer`` with its
    queue), which an ext_proc stream never reads: its handler gives it a ``MessageBuffer`` at
    once (:func:`use_buffer`). A stream handled without a task never needs any of them."""

    def __init__(self, connection: Any, h2_connection: H2Connection, transport: Any, stream_id: int) -> None:
        self.connection = connection
        self._h2_connection = h2_connection
        self._transport = transport
        self.wrapper = None
        self.id = stream_id  # init_stream, but for the buffer
        connection.streams_started += 1
        self.created = connection.last_stream_created = time.monotonic()
        self.headers = None
        self.trailers = None

    block: _Block | None = None  # the kept header block it was opened from (set by ``_open_stream``)
    buffer = _OnFirstUse(lambda self: Buffer(functools.partial(self.connection.ack, self.id)))
    window_updated = _OnFirstUse(lambda self: asyncio.Event())
    headers_received = _OnFirstUse(lambda self: asyncio.Event())
    trailers_received = _OnFirstUse(lambda self: asyncio.Event())


_H2_STREAM_NEW = H2Stream.__new__
_MACHINE_NEW = H2StreamStateMachine.__new__
_WINDOW_NEW = WindowManager.__new__


def _new_h2_stream(conn: H2Connection, stream_id: int) -> H2Stream:
    """The ``H2Stream`` h2's ``_begin_new_stream`` builds for a client's new stream, after its
    ``receive_headers`` of a request's headers without ``content-length`` (the state machine's
    ``request_received``: OPEN, ``client`` False, headers received), attribute for attribute,
    without the constructors' calls, checks and no-op logging (``tests/unit/test_h2compat.py``
    compares every attribute with h2's)."""
    machine = _MACHINE_NEW(H2StreamStateMachine)
    machine.state = StreamState.OPEN
    machine.stream_id = stream_id
    machine.client = False
    machine.headers_sent = None
    machine.trailers_sent = None
    machine.headers_received = True
    machine.trailers_received = None
    machine.stream_closed_by = None
    window = _WINDOW_NEW(WindowManager)
    window.max_window_size = window.current_window_size = _initial_window(conn.local_settings)
    window._bytes_processed = 0
    s = _H2_STREAM_NEW(H2Stream)
    s.state_machine = machine
    s.stream_id = stream_id
    s.max_outbound_frame_size = conn.max_outbound_frame_size
    s.request_method = None
    s.outbound_flow_control_window = _initial_window(conn.remote_settings)
    s._inbound_window_manager = window
    s._expected_content_length = None
    s._actual_content_length = 0
    s._authority = None
    s.config = conn.config
    return s


def _reset_stream(protocol: H2Protocol, conn: H2Connection, h2s: Any, on_reset: Callable[[int], None]) -> None:
    """What h2's ``_receive_frame`` -> ``_receive_rst_stream_frame`` and grpclib's
    ``H2Protocol.data_received`` do for a well-formed RST_STREAM (4 bytes, no flags) on a stream
    h2 has open (OPEN or half closed) on an open server connection: the connection's
    RECV_RST_STREAM input (no state change, no callback in SERVER_OPEN), the stream's
    (``H2Stream.stream_reset``: CLOSED, closed by RECV_RST_STREAM, the ``StreamReset`` event), no
    frame to send; then the event's handler (:func:`on_stream_reset`'s ``callback``) with the
    stream id, h2's output flushed before and after as grpclib does. h2 keeps the closed stream in
    ``streams`` until its next count of the open streams moves it to ``_closed_streams`` with
    its reason (``closed_by``), here as there."""
    machine = h2s.state_machine
    machine.state = StreamState.CLOSED
    machine.stream_closed_by = StreamClosedBy.RECV_RST_STREAM
    grpc_conn = protocol.connection
    if conn._data_to_send:
        grpc_conn.flush()
    on_reset(h2s.stream_id)
    if conn._data_to_send:
        grpc_conn.flush()


def frame_end(protocol: H2Protocol, data: bytes, offset: int) -> int:
    """Where the frame at ``data[offset:]`` ends if it is complete and h2 holds no partial frame
    (so h2 can take it on its own; a header block awaiting CONTINUATION is fine: the frame is
    the next one h2 reads, whatever it is); the connection preface counts as a frame. 0
    otherwise: the rest of ``data`` is for h2 as it is."""
    incoming = h2_connection(protocol).incoming_buffer
    if incoming._data:
        return 0
    if incoming._preamble_len:
        end = offset + incoming._preamble_len
    elif offset + 9 <= len(data):
        end = offset + 9 + int.from_bytes(data[offset : offset + 3], "big")
    else:
        return 0
    return end if end <= len(data) else 0


def failed(protocol: H2Protocol) -> bool:
    """Whether grpclib closed the connection for a protocol error (``EventsProcessor.close``)."""
    return not hasattr(protocol.processor, "processors")


_MAXSIZE: Any = HeaderTable.__dict__["maxsize"]  # hpack's property


class _CountingTable(HeaderTable):
    """hpack's dynamic table, counting the calls that can change it: an entry added, a new
    maximum size set (a dynamic table size update, or h2 applying a setting). hpack changes the
    table through these two only (``_shrink`` runs inside them)."""

    changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    def _set_maxsize(self, newmax: int) -> None:
        self.changes += 1
        _MAXSIZE.fset(self, newmax)

    maxsize = property(_MAXSIZE.fget, _set_maxsize)  # type: ignore[assignment]


NOT_DERIVED: Any = object()  # a block's ``derived`` before the server set it


class _Block:
    """A header block's decoded headers (hpack's raw ``HeaderTuple``s), hpack's size of the list
    (what ``max_header_list_size`` bounds), and whether h2 receives them as a new request's
    headers without anything to refuse (:func:`receive_frames`): all ASCII (h2 decodes them
    with grpclib's ``ascii`` encoding), no ``:status`` (an informational response), no
    ``content-length`` (a value h2 checks, and whose stream it tracks).

    ``derived`` is the server's: what it computes from the request headers of a stream opened
    from this block (:meth:`request_headers`) and keeps for the next such streams, so every
    stream after the first reads it instead of computing it (:data:`NOT_DERIVED` until then, and
    again when the headers are handed out in another form: another ``header_encoding``)."""

    __slots__ = ("headers", "size", "plain", "_request", "derived")

    def __init__(self, headers: list[Any]) -> None:
        self.headers = headers
        self.size = sum(table_entry_size(n, v) for n, v in headers)
        self.plain = all(n.isascii() and v.isascii() and n not in _NOT_PLAIN for n, v in headers)
        self._request: tuple[Any, list[Any]] | None = None
        self.derived: Any = NOT_DERIVED

    def request_headers(self, encoding: Any) -> list[Any]:
        """The headers as h2 hands a request's to grpclib (``H2Stream.receive_headers`` with
        validation and normalisation off: with a str ``header_encoding`` each decoded with it,
        its ``HeaderTuple`` class kept, else hpack's bytes as they are), a new list each time;
        decoded once per block and encoding."""
        request = self._request
        if request is None or request[0] != encoding:
            raw = self.headers
            headers = [h.__class__(h[0].decode(encoding), h[1].decode(encoding)) for h in raw] if isinstance(encoding, str) else raw[:]
            request = self._request = (encoding, headers)
            self.derived = NOT_DERIVED
        return request[1][:]


def header_block(stream: Any) -> _Block | None:
    """The kept header block a transport-level stream was opened from past h2
    (:func:`receive_frames`), whose ``derived`` the server may read and set; None for a stream
    h2 opened (its headers decoded by h2's parser)."""
    return stream.block if stream.__class__ is _ServerStream else None


_NOT_PLAIN = (b":status", b"content-length")
BLOCKS_KEPT = 4  # header blocks cached per connection
BLOCK_MAX = 512  # bytes: a longer header block is decoded every time


class _CachingDecoder(Decoder):
    """h2's HPACK decoder, remembering the last few header blocks whose decoding changed
    nothing. A block that neither adds to the dynamic table nor resizes it (indexed fields,
    literals without indexing) decodes to the same headers for as long as the table is
    unchanged: Envoy sends every ext_proc stream after a connection's first the same bytes, so
    each is decoded once per connection instead of per stream (the Huffman-coded ``:path``
    included). Any change of the table (:class:`_CountingTable`) drops what was kept, and a
    block is served from the cache only while the limits hpack checks at the end of a decode
    still hold (``max_header_list_size``, the table within ``max_allowed_table_size``);
    otherwise it is decoded as usual, which raises as usual. The cache is bounded: at most
    :data:`BLOCKS_KEPT` blocks of at most :data:`BLOCK_MAX` bytes (the client chooses them)."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size)
        self.header_table: _CountingTable = _CountingTable()
        self.blocks: dict[bytes, _Block] = {}
        self.changes = 0  # the table's count when the kept blocks were decoded

    def cached(self, data: bytes) -> _Block | None:
        """``data``'s decoding, if kept and still what decoding it now would give, else None."""
        block = self.blocks.get(data)
        if (
            block is None
            or self.header_table.changes != self.changes
            or block.size > self.max_header_list_size
            or self.header_table._maxsize > self.max_allowed_table_size  # hpack's ``header_table_size``
        ):
            return None
        return block

    def decode(self, data: bytes, raw: bool = False) -> Any:
        if not raw or data.__class__ is not bytes:  # h2 decodes bytes, raw
            return super().decode(data, raw)
        block = self.cached(data)
        if block is not None:
            return block.headers[:]
        table = self.header_table
        changes = table.changes
        headers = super().decode(data, raw)
        if table.changes == changes and len(data) <= BLOCK_MAX:
            blocks = self.blocks
            if self.changes != changes:
                blocks.clear()
                self.changes = changes
            elif len(blocks) >= BLOCKS_KEPT:
                del blocks[next(iter(blocks))]  # the oldest
            blocks[data] = _Block(list(headers))
        return headers


def cache_header_blocks(protocol: H2Protocol) -> bool:
    """Give a new connection's h2 a :class:`_CachingDecoder` (same limits, same empty table).
    False, changing nothing, if its decoder is not a fresh hpack ``Decoder``."""
    conn = h2_connection(protocol)
    old = conn.decoder
    if old.__class__ is not Decoder or old.header_table.dynamic_entries or old.header_table_size != HeaderTable.DEFAULT_SIZE:
        return False
    new = _CachingDecoder(old.max_header_list_size)
    new.max_allowed_table_size = old.max_allowed_table_size
    conn.decoder = new
    return True


class _LazyRepr:
    """``repr(obj)``, computed only if formatted (a log line that is emitted)."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __str__(self) -> str:
        return builtins.repr(self.obj)

    __repr__ = __str__


def lazy_frame_repr() -> None:
    """h2 (``H2Connection._receive_frame``) computes ``repr(frame)`` of every frame it receives,
    for a trace log line that its default logger drops: a few percent of the CPU per streamed
    chunk. ``repr`` is looked up in ``h2.connection``'s globals before the builtins, so a
    module-level ``repr`` there makes that formatting lazy (the trace line, when a logger does
    emit it, reads the same). That call is the module's only use of ``repr``."""
    h2.connection.repr = _LazyRepr  # type: ignore[attr-defined]


def forget_when_done(handler: Handler, stream: Any) -> asyncio.Task[Any]:
    """The task ``Handler.accept`` just started for ``stream``, set to leave the handler's table
    as soon as it is done. grpclib prunes that table only every 10th new stream *on the same
    connection*, so each connection kept up to ~10 finished streams (their buffers, queues and
    events: ~10 KB each) until its next streams came: with hundreds of Envoy connections that
    is tens of MB per worker after a burst."""
    tasks = handler._tasks
    task = tasks[stream]
    task.add_done_callback(lambda _t: tasks.pop(stream, None))
    return task


def cancel_stream(handler: Handler, stream: Any) -> None:
    """``Handler.cancel`` for a stream whose task may already be done (and forgotten)."""
    task = handler._tasks.pop(stream, None)
    if task is not None and not task.done():
        task.cancel()
        cancelled = handler._cancelled
        cancelled.add(task)
        task.add_done_callback(cancelled.discard)
