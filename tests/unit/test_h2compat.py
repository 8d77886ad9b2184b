"""Each private grpclib / h2 detail ``extproc.server.h2compat`` relies on, checked against the
installed versions: an upgrade that moves one fails here, by name."""

from __future__ import annotations

import asyncio
from functools import partial

import grpc
import pytest
from grpclib.server import Handler
from h2.connection import H2Connection

from extproc.core.call import NO_RESPONSE, OK
from extproc.core.config import parse
from extproc.devtools.dev import free_port
from extproc.server import grpc_server, h2compat
from extproc.server.grpc_server import build_server
from extproc.server.message_buffer import MessageBuffer
from extproc.server.processor import Processor
from tests.support.transport import RecordingTransport
from tests.unit.test_processor import Recorder
from tests.unit.test_servers import REQ, RESP, _in_flight, _wait


def test_server_configuration_and_events():
    cfg = h2compat.server_configuration()
    assert type(cfg).__name__ == "Configuration"

    async def main() -> None:  # grpclib's Handler wants a running loop
        handler = Handler({}, None, None, h2compat.server_events())
        assert h2compat.cancelled_tasks(handler) == []  # Handler._cancelled exists (a set of tasks)

    asyncio.run(main())


def test_connection_internals_on_a_live_connection():
    address = f"127.0.0.1:{free_port()}"
    recorder = Recorder()
    processor = Processor(parse({"listen": address}), [recorder])
    server = build_server(processor, address)

    async def main() -> None:
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                first = await _in_flight(ch)  # stream id 1
                [proto] = server._protocols
                conn = h2compat.h2_connection(proto)
                assert isinstance(conn, H2Connection) and conn.highest_inbound_stream_id == 1
                assert h2compat.limit_closed_streams(proto, 7) is True
                assert conn._closed_streams._size_limit == 7
                assert h2compat.stream_of(proto, 1) is not None and h2compat.stream_of(proto, 99) is None

                # RST_STREAM reaches our handler: the stream's task is cancelled and reported once.
                second = await _in_flight(ch)
                await _wait(lambda: processor.counters.active == 2)
                second.cancel()
                await _wait(lambda: processor.counters.active == 1)

                # GOAWAY: the stream in flight keeps working to its end.
                h2compat.send_goaway(proto)
                await first.write(RESP)
                assert (await first.read()).HasField("response_headers")
                await first.done_writing()
                assert await first.code() == grpc.StatusCode.OK
                await _wait(lambda: len(recorder.calls) == 2)
                assert sorted(c.outcome for c in recorder.calls) == sorted([NO_RESPONSE, OK])
        finally:
            await server.stop(0)

    asyncio.run(main())
    assert REQ.HasField("request_headers")


def test_lazy_frame_repr():
    """h2.connection calls ``repr`` once, for the trace line of each received frame; ours formats
    the same text, only when the line is emitted."""
    import ast
    import inspect

    import h2.connection
    from hyperframe.frame import DataFrame

    tree = ast.parse(inspect.getsource(h2.connection))
    calls = [
        (fn.name, node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "repr"
    ]
    assert [name for name, _ in calls] == ["_receive_frame"]
    h2compat.lazy_frame_repr()
    frame = DataFrame(1, b"hello")
    assert str(h2.connection.repr(frame)) == repr(frame)  # as logging formats "%s"


# the gRPC request headers a client opens an ext_proc stream with
REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
    (":authority", "x"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def _grpc_frame(msg) -> bytes:
    data = msg.SerializeToString()
    return b"\0" + len(data).to_bytes(4, "big") + data


def test_send_message_now_within_flow_control(monkeypatch):
    """Replies after the first go out through ``send_message_now`` while the client's windows
    allow; a client that stops acknowledging (a 64-byte stream window, as a slow Envoy) stalls
    them (grpclib's ``send_message`` waits for the window instead), and once it acknowledges the
    rest arrive, in order. h2 on the client side rejects any frame beyond its window, so an
    over-sent reply fails this test as a protocol error."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, StreamEnded, TrailersReceived
    from h2.settings import SettingCodes

    from extproc._pb.envoy_api import external_processor_pb2 as pb
    from tests.unit.test_processor import body, headers, req_headers

    sent_now = []
    real = h2compat.send_message_now

    def counting(stream, message):
        ok = real(stream, message)
        sent_now.append(ok)
        return ok

    monkeypatch.setattr(grpc_server, "_send_now", counting)  # the server binds it once
    port = free_port()
    recorder = Recorder()
    processor = Processor(parse({"listen": f"127.0.0.1:{port}"}), [recorder])
    server = build_server(processor, f"127.0.0.1:{port}")
    n = 40
    messages = [
        req_headers(),
        body("request_body", b'{"model":"m","stream":true}', end=True),
        headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
    ]
    messages += [body("response_body", b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n') for _ in range(n)]

    async def main() -> None:
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        c.initiate_connection()
        c.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 64})
        sid = c.get_next_available_stream_id()
        c.send_headers(
            sid,
            REQUEST_HEADERS,
        )
        c.send_data(sid, b"".join(_grpc_frame(m) for m in messages))
        writer.write(c.data_to_send())
        received = bytearray()
        unacked = 0
        trailers = None

        async def pump(ack: bool, until) -> None:
            nonlocal unacked, trailers
            while not until():
                if ack and unacked:
                    c.acknowledge_received_data(unacked, sid)
                    unacked = 0
                    writer.write(c.data_to_send())
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data
                for ev in c.receive_data(data):
                    if isinstance(ev, DataReceived):
                        received.extend(ev.data)
                        unacked += ev.flow_controlled_length
                    elif isinstance(ev, TrailersReceived):
                        trailers = dict(ev.headers)
                    elif isinstance(ev, StreamEnded):
                        return
                writer.write(c.data_to_send())

        await pump(False, lambda: len(received) >= 64)  # the stream window is full
        await asyncio.sleep(0.3)  # the server holds the rest back: nothing more may arrive
        assert len(received) == 64
        await pump(True, lambda: _count(received) == len(messages))
        c.end_stream(sid)
        writer.write(c.data_to_send())
        await pump(True, lambda: trailers is not None)
        assert trailers is not None and trailers["grpc-status"] == "0"
        replies = _messages(bytes(received))
        kinds = [pb.ProcessingResponse.FromString(r).WhichOneof("response") for r in replies]
        assert kinds == ["request_headers", "request_body", "response_headers"] + ["response_body"] * n
        # handed to a task when the window held a reply back: still reported once, its slot freed
        await _wait(lambda: processor.counters.active == 0)
        assert not server.exchanges and server.cap.open == 0 and len(recorder.calls) == 1
        writer.close()
        await server.stop(0)

    asyncio.run(main())
    assert sent_now.count(True) > 0 and sent_now.count(False) > 0  # both paths were taken


def test_nothing_is_sent_now_while_the_transport_is_paused():
    """A paused transport (grpclib's ``write_ready`` cleared by ``pause_writing``) holds replies
    and response headers back: ``send_message_now`` and ``send_response_headers_now`` send
    nothing and say so, as grpclib's ``send_message`` would wait; once resumed they send."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    async def main() -> None:
        server = build_server(Processor(parse({"listen": "127.0.0.1:1"}), []), "127.0.0.1:1")
        proto = server._protocol_factory()
        transport = RecordingTransport()
        proto.connection_made(transport)
        client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        client.initiate_connection()
        client.send_headers(1, REQUEST_HEADERS)
        proto.data_received(client.data_to_send())
        ps = h2compat.stream_of(proto, 1)
        proto.pause_writing()
        before = bytes(transport.written)
        assert not h2compat.send_response_headers_now(ps) and not h2compat.send_message_now(ps, b"reply")
        proto._out.flush()
        assert transport.written == before
        proto.resume_writing()
        assert h2compat.send_response_headers_now(ps) and h2compat.send_message_now(ps, b"reply")
        proto._out.flush()
        assert transport.written.endswith(b"\0\0\0\0\x05reply")

    asyncio.run(main())


def _messages(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        size = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if pos + 5 + size > len(data):
            break
        out.append(data[pos + 5 : pos + 5 + size])
        pos += 5 + size
    return out


def _count(data: bytearray) -> int:
    return len(_messages(bytes(data)))


def test_finished_streams_leave_the_handler_table_at_once():
    """grpclib prunes a connection's table of stream tasks only every 10th new stream on that
    connection; forget_when_done drops each finished one at once, and cancel_stream accepts a
    stream already dropped. (Streams with a deadline get a task from the start.)"""
    address = f"127.0.0.1:{free_port()}"
    processor = Processor(parse({"listen": address}), [Recorder()])
    server = build_server(processor, address)

    async def main() -> None:
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                calls = []
                for _ in range(3):
                    call = ch.stream_stream(
                        "/envoy.service.ext_proc.v3.ExternalProcessor/Process", request_serializer=lambda m: m.SerializeToString()
                    )(timeout=30)
                    await call.write(REQ)
                    await call.read()
                    calls.append(call)
                [proto] = server._protocols
                assert len(proto.handler._tasks) == 3 and not server.exchanges
                for call in calls:
                    await call.done_writing()
                    await call.code()
                await _wait(lambda: not proto.handler._tasks)
                stream = object()
                h2compat.cancel_stream(proto.handler, stream)  # unknown or already forgotten: nothing to do
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_a_serving_worker_does_not_import_grpcio():
    """grpcio (~20 MB of RSS) is for the `extproc health` probe only."""
    import subprocess
    import sys

    code = "import sys, extproc.cli, extproc.server.worker, extproc.server.supervisor; assert 'grpc' not in sys.modules, 'grpcio imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _client_bytes() -> bytes:
    """What an Envoy might send: the preface and settings, two ext_proc streams, their messages
    as DATA frames of several shapes (one message per frame, several per frame, one split over
    frames, padded, END_STREAM, an empty one), window updates and a ping in between."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    from tests.unit.test_processor import body

    c = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    c.send_headers(1, REQUEST_HEADERS)
    c.send_headers(3, REQUEST_HEADERS)
    chunk = _grpc_frame(body("response_body", b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'))
    for _ in range(6):
        c.send_data(1, chunk)
        c.send_data(3, chunk * 2)
    c.increment_flow_control_window(1000)
    big = _grpc_frame(body("response_body", b"y" * 40000))
    for i in range(0, len(big), 9000):
        c.send_data(1, big[i : i + 9000])
    c.send_data(3, chunk, pad_length=7)
    c.ping(b"12345678")
    c.send_data(1, b"")
    c.send_data(1, chunk, end_stream=True)
    c.send_data(3, chunk)
    return c.data_to_send()


def _pieces(data: bytes, split: int | str) -> list[bytes]:
    """``data`` cut every ``split`` bytes, or ("frames", "2frames") at every (second) frame's end,
    the connection preface alone first (as Envoy's reads would cut it)."""
    if isinstance(split, int):
        return [data[i : i + split] for i in range(0, len(data), split)]
    ends, pos = [24], 24
    while pos < len(data):
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
        ends.append(pos)
    step = 2 if split == "2frames" else 1
    cuts = [0, 24] + ends[1::step] + [len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


_REAL = {
    "receive_frames": h2compat.receive_frames,
    "_open_stream": h2compat._open_stream,
    "_reset_stream": h2compat._reset_stream,
    "accept": grpc_server._Handler.accept,
}


def _receive(
    data: bytes, split: int | str, fast: bool, monkeypatch, fast_ack: bool = True, setup=None, untasked: bool = False
) -> tuple[dict, dict]:
    """Feed ``data`` in pieces (see ``_pieces``) to a server connection, until it closes; its h2,
    grpclib and buffer state after, and what the fast path took: ``data`` bytes (DATA payloads),
    ``headers`` (streams opened by ``_open_stream``) and ``resets`` (RST_STREAMs taken by
    ``_reset_stream``). ``fast`` False: plain grpclib and h2 (``H2Protocol.data_received``, hpack's
    decoder). ``fast_ack`` False: the buffers acknowledge through grpclib's ``Connection.ack``
    instead of ``h2compat.acknowledger``. ``setup(h2 connection)`` runs once the connection is
    made. ``untasked``: ext_proc streams are handled without a task, as in production (each
    message answered where it is read, each call reported where its reset is), else each
    stream gets a task that never runs (its messages stay in its buffer, compared)."""
    with pytest.MonkeyPatch.context() as patch:  # undone after each run: fast and plain runs alternate
        return _receive_patched(data, split, fast, patch, fast_ack, setup, untasked)


def _receive_patched(data: bytes, split: int | str, fast: bool, monkeypatch, fast_ack: bool, setup, untasked: bool) -> tuple[dict, dict]:
    from grpclib.protocol import H2Protocol

    taken = {"data": 0, "headers": 0, "resets": 0}
    if not fast_ack:
        monkeypatch.setattr(h2compat, "acknowledger", lambda stream: partial(stream.connection.ack, stream.id))
    if fast:
        receive_frames, open_stream = _REAL["receive_frames"], _REAL["_open_stream"]

        def counting(protocol, piece, offset=0):
            before = protocol.connection.data_received
            end = receive_frames(protocol, piece, offset)
            taken["data"] += protocol.connection.data_received - before
            return end

        def opening(*args):
            taken["headers"] += 1
            open_stream(*args)

        def resetting(*args):
            taken["resets"] += 1
            reset_stream(*args)

        reset_stream = _REAL["_reset_stream"]
        monkeypatch.setattr(h2compat, "receive_frames", counting)
        monkeypatch.setattr(h2compat, "_open_stream", opening)
        monkeypatch.setattr(h2compat, "_reset_stream", resetting)
    else:

        def plain(self, data: bytes) -> None:
            H2Protocol.data_received(self, data)
            self._out.flush()

        monkeypatch.setattr(grpc_server._Protocol, "data_received", plain)
        monkeypatch.setattr(h2compat, "cache_header_blocks", lambda protocol: False)
    accepted: list = []
    header_classes: list = []
    accept = _REAL["accept"]

    def recording(self, stream, headers, release_stream):
        accepted.append((stream.id, [tuple(h) for h in headers]))
        header_classes.append([h.__class__ for h in headers])  # hpack's HeaderTuple / NeverIndexedHeaderTuple, kept
        accept(self, stream, headers, release_stream)

    monkeypatch.setattr(grpc_server._Handler, "accept", recording)
    recorder = Recorder()
    processor = Processor(parse({"listen": "127.0.0.1:1"}), [recorder])
    server = build_server(processor, "127.0.0.1:1")
    if not untasked:
        server.untasked.clear()  # streams in tasks that never run here: the messages stay in the buffers to compare

    async def main() -> dict:
        proto = server._protocol_factory()
        transport = RecordingTransport()
        proto.connection_made(transport)
        conn = h2compat.h2_connection(proto)
        if setup is not None:
            setup(conn)
            proto.connection.flush()
        for piece in _pieces(data, split):
            if transport.closed:
                break
            proto.data_received(piece)
        streams = {}
        for sid in sorted(set(conn.streams) | set(proto.processor.streams)):
            h2s = conn.streams.get(sid)
            ps = h2compat.stream_of(proto, sid)
            messages = []
            ours = ps is not None and isinstance(ps.buffer, MessageBuffer)  # an ext_proc stream
            if ours and not transport.closed:  # (reading acknowledges: not on a closed connection)
                while (m := ps.buffer.next_message()) is not None:
                    messages.append(m)
            streams[sid] = (
                h2s and _h2_stream_state(h2s),
                ps and _grpclib_stream_state(ps),
                ours and (messages, ps.buffer.ended, ps.buffer.unacked_size(), ps.data_received),
            )
        proto._out.flush()
        state = {
            "connection": (conn.state_machine.state, conn.highest_inbound_stream_id, sorted(conn._closed_streams.items())),
            "window": (
                conn._inbound_flow_control_window_manager.current_window_size,
                conn._inbound_flow_control_window_manager._bytes_processed,
            ),
            "data_received": proto.connection.data_received,
            "streams_failed": proto.connection.streams_failed,  # resets handled (``_Protocol._stream_reset``)
            "streams_started": proto.connection.streams_started,
            "streams": streams,
            "accepted": accepted,
            "header_classes": header_classes,
            "written": bytes(transport.written),
            "unsent": bytes(conn._data_to_send),  # (grpclib closes on a protocol error without sending h2's GOAWAY)
            "closed": transport.closed,
            "calls": [(c.outcome, c.path, c.status) for c in recorder.calls],  # the calls reported (streams without a task)
            "exchanges": sorted(ps.id for ps in server.exchanges),  # streams without a task still open
        }
        for task in list(proto.handler._tasks.values()):
            task.cancel()
        return state

    return asyncio.run(main()), taken


def _h2_stream_state(h2s) -> dict:
    """Everything h2 keeps for a stream (its state machine's and window manager's attributes
    included), but the connection's configuration object it shares."""
    state = {k: v for k, v in vars(h2s).items() if k not in ("config", "state_machine", "_inbound_window_manager")}
    state["config"] = h2s.config.__class__
    state["state_machine"] = (h2s.state_machine.__class__, vars(h2s.state_machine))
    state["_inbound_window_manager"] = (h2s._inbound_window_manager.__class__, vars(h2s._inbound_window_manager))
    return state


def _grpclib_stream_state(ps) -> dict:
    """grpclib's transport-level stream as its request handler would find it (its asyncio
    objects made, if they were not yet)."""
    return {
        "id": ps.id,
        "wrapper": ps.wrapper.__class__,
        "headers": ps.headers,
        "trailers": ps.trailers,
        "created": ps.created.__class__,  # (a clock's reading)
        "events": [e.__class__ for e in (ps.window_updated, ps.headers_received, ps.trailers_received)],
        "set": [e.is_set() for e in (ps.window_updated, ps.headers_received, ps.trailers_received)],
        "buffer": ps.buffer.__class__,
        "connection": (ps.connection.__class__, ps._h2_connection.__class__, ps._transport.__class__),
    }


@pytest.mark.parametrize("split", [1, 7, 9, 64, 1000, 1 << 20, "frames", "2frames"])
def test_data_frames_past_h2_leave_the_same_state(split, monkeypatch):
    """``receive_frames`` (DATA frames straight into the stream's buffer) against h2's own
    path, on the same bytes cut at every kind of boundary: the same windows, stream states,
    counts, messages read and bytes written back (WINDOW_UPDATEs, the PING ack); and it does take
    the frames when they arrive whole."""
    data = _client_bytes()
    fast, taken = _receive(data, split, True, monkeypatch)
    slow, _ = _receive(data, split, False, monkeypatch)
    assert fast == slow
    assert len(fast["streams"][1][2][0]) == 8 and len(fast["streams"][3][2][0]) == 14  # every message read
    if isinstance(split, str):  # whole frames per read, as Envoy's: the DATA frames go past h2
        assert taken["data"] > 30000


@pytest.mark.parametrize("split", [1, 9, 1000, "frames"])
def test_acknowledgments_past_h2_leave_the_same_state(split, monkeypatch):
    """``acknowledger`` (bytes counted on h2's window managers while no WINDOW_UPDATE is due)
    against grpclib's ``Connection.ack``: the same windows, counts and bytes written back (the
    large message's WINDOW_UPDATEs go through h2)."""
    data = _client_bytes()
    fast, _ = _receive(data, split, True, monkeypatch)
    slow, _ = _receive(data, split, True, monkeypatch, fast_ack=False)
    assert fast == slow
    assert b"\x00\x00\x04\x08" in fast["written"]  # a WINDOW_UPDATE frame was written back


def test_an_acknowledgment_counted_past_h2_is_one_h2_would_only_count():
    """``acknowledger`` counts the bytes itself exactly when h2 would only count them on both
    window managers (the negation of h2's window-update condition, at every boundary, for the
    connection's window and the stream's), else leaves the acknowledgment to grpclib."""
    import types

    from h2.stream import StreamState
    from h2.windows import WindowManager

    cases = [
        (limit, current, processed, size)
        for limit in (100, 4096, 65535)
        for current in (0, 1, limit // 2, limit)
        for processed in (0, 1, 24, 25, 26, 49, 50, 1023, 1024, 1025, limit // 4, limit // 2 - 1, limit // 2)
        for size in (1, 2, 25)
        if processed <= limit
    ]
    roomy = (65535, 65535, 0)
    for limit, current, processed, size in cases:
        for conn_window, stream_window in (((limit, current, processed), roomy), (roomy, (limit, current, processed))):
            windows = []
            for lim, cur, proc in (conn_window, stream_window):
                w = WindowManager(lim)
                w.current_window_size, w._bytes_processed = cur, proc
                windows.append(w)
            h2s = types.SimpleNamespace(state_machine=types.SimpleNamespace(state=StreamState.OPEN), _inbound_window_manager=windows[1])
            conn = types.SimpleNamespace(_inbound_flow_control_window_manager=windows[0], streams={1: h2s}, _data_to_send=b"")
            slow: list = []
            stream = types.SimpleNamespace(connection=types.SimpleNamespace(_connection=conn, ack=lambda sid, n: slow.append(n)), id=1)
            h2compat.acknowledger(stream)(size)
            counted = not slow
            expect = []
            for (lim, cur, proc), w in zip((conn_window, stream_window), windows):
                h2w = WindowManager(lim)
                h2w.current_window_size, h2w._bytes_processed = cur, proc
                only_counted = not h2w.process_bytes(size) and h2w._bytes_processed == proc + size and h2w.current_window_size == cur
                expect.append(only_counted)
                if counted:  # counted here: as h2 counts it
                    assert (w._bytes_processed, w.current_window_size) == (h2w._bytes_processed, cur)
                else:  # left to grpclib: untouched here
                    assert (w._bytes_processed, w.current_window_size) == (proc, cur)
            assert counted == all(expect), (conn_window, stream_window, size)


def test_the_constant_response_headers_are_what_grpclib_sends():
    """The pre-encoded block reads as grpclib's ``send_initial_metadata`` headers for our codec
    and leaves a decoder's dynamic table empty (so the encoder's, which it bypasses, stays in step)."""
    from grpclib.server import Stream
    from hpack import Decoder

    from extproc.server.grpc_server import _Codec

    stream = Stream.__new__(Stream)
    stream._codec = _Codec()
    assert stream._content_type == h2compat.RESPONSE_CONTENT_TYPE
    decoder = Decoder()
    assert decoder.decode(h2compat.RESPONSE_HEADERS_BLOCK) == [(":status", "200"), ("content-type", h2compat.RESPONSE_CONTENT_TYPE)]
    assert len(decoder.header_table.dynamic_entries) == 0


def test_response_headers_sent_now_or_through_h2(monkeypatch):
    """Streams on one connection get their response headers from the constant block, and h2's
    trailers after them decode; after the client changes its HPACK table size (an update must
    open the next header block) the headers go through h2 instead, which emits the update; every
    stream's replies, headers and trailers read right on an h2 client."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, ResponseReceived, StreamEnded, TrailersReceived
    from h2.settings import SettingCodes

    from extproc._pb.envoy_api import external_processor_pb2 as pb
    from tests.unit.test_processor import body, req_headers

    sent_now = []
    real = h2compat.send_response_headers_now

    def counting(stream):
        ok = real(stream)
        sent_now.append(ok)
        return ok

    monkeypatch.setattr(grpc_server, "_send_headers_now", counting)  # the server binds it once
    port = free_port()
    processor = Processor(parse({"listen": f"127.0.0.1:{port}"}), [Recorder()])
    server = build_server(processor, f"127.0.0.1:{port}")
    messages = [req_headers(), body("request_body", b'{"model":"m"}', end=True)]

    async def main() -> None:
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        c.initiate_connection()
        writer.write(c.data_to_send())

        async def exchange() -> tuple[dict, list[str], dict]:
            sid = c.get_next_available_stream_id()
            c.send_headers(
                sid,
                REQUEST_HEADERS,
            )
            c.send_data(sid, b"".join(_grpc_frame(m) for m in messages), end_stream=True)
            writer.write(c.data_to_send())
            received, response, trailers = bytearray(), None, None
            while trailers is None:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data
                for ev in c.receive_data(data):
                    if isinstance(ev, ResponseReceived) and ev.stream_id == sid:
                        response = dict(ev.headers)
                    elif isinstance(ev, DataReceived) and ev.stream_id == sid:
                        received.extend(ev.data)
                        c.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, TrailersReceived) and ev.stream_id == sid:
                        trailers = dict(ev.headers)
                    elif isinstance(ev, StreamEnded):
                        pass
                writer.write(c.data_to_send())
            kinds = [pb.ProcessingResponse.FromString(r).WhichOneof("response") for r in _messages(bytes(received))]
            return response, kinds, trailers

        expected = (
            {":status": "200", "content-type": h2compat.RESPONSE_CONTENT_TYPE},
            ["request_headers", "request_body"],
            {"grpc-status": "0"},
        )
        for _ in range(2):
            assert await exchange() == expected
        assert sent_now == [True, True]
        c.update_settings({SettingCodes.HEADER_TABLE_SIZE: 256})
        writer.write(c.data_to_send())
        assert await exchange() == expected  # the settings and the stream arrive in one read
        assert sent_now[2] is False
        assert await exchange() == expected
        assert sent_now[3] is True
        writer.close()
        await server.stop(0)

    asyncio.run(main())


def test_constant_response_headers_leave_h2s_stream_state_as_h2_would():
    """After the constant block h2's stream knows its response headers went out (the next header
    block it sends is trailers), and the client's h2 reads the block as the stream's response."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ResponseReceived

    from tests.unit.test_processor import req_headers

    c = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    c.send_headers(
        1,
        REQUEST_HEADERS,
    )
    c.send_data(1, _grpc_frame(req_headers()))
    processor = Processor(parse({"listen": "127.0.0.1:1"}), [Recorder()])
    server = build_server(processor, "127.0.0.1:1")

    async def main() -> None:
        proto = server._protocol_factory()
        transport = RecordingTransport()
        proto.connection_made(transport)
        proto.data_received(c.data_to_send())
        await asyncio.sleep(0.01)  # the stream's task answers the first message
        proto.connection._transport.flush()
        machine = h2compat.h2_connection(proto).streams[1].state_machine
        assert machine.headers_sent and not machine.trailers_sent
        events = c.receive_data(bytes(transport.written))
        [response] = [e for e in events if isinstance(e, ResponseReceived)]
        assert dict(response.headers)[":status"] == "200"
        for task in list(proto.handler._tasks.values()):
            task.cancel()
        await asyncio.sleep(0)

    asyncio.run(main())


# Envoy 1.40's header block for each ext_proc stream after a connection's first: indexed fields,
# literals without indexing (``:path`` Huffman-coded) and references to the dynamic table.
ENVOY_BLOCK = bytes.fromhex("8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d8721508c286c1c0bfbe")
ENVOY_HEADERS = [
    (b":method", b"POST"),
    (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
    (b"x-forwarded-for", b"192.0.2.2"),
    (b":scheme", b"http"),
    (b"x-envoy-internal", b"true"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b":authority", b"ext_proc"),
]
# a block that adds an entry (literal with incremental indexing): every later reference shifts
INDEXING_BLOCK = b"\x83\x86\x84" + b"\x40\x05x-new\x01v"


def _envoy_first_block() -> bytes:
    """A first block as Envoy's: a dynamic table size update, then literals with indexing that
    leave the table as the later :data:`ENVOY_BLOCK` reads it."""
    from hpack import Encoder
    from hpack.struct import NeverIndexedHeaderTuple

    entries = [(b"x-forwarded-for", b"192.0.2.2"), (b"x-envoy-internal", b"true"), (b"content-type", b"application/grpc")]
    entries += [(b"te", b"trailers"), (b":authority", b"ext_proc")]
    rest = [(b":method", b"POST"), NeverIndexedHeaderTuple(b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process")]
    return bytes.fromhex("3fe11f") + Encoder().encode(entries + rest + [(b":scheme", b"http")])


def _decode_all(decoder, blocks) -> list:
    out = []
    for block in blocks:
        try:
            out.append(("ok", [tuple(h) for h in decoder.decode(block, raw=True)], len(decoder.header_table.dynamic_entries)))
        except Exception as e:  # the same exception, with the same message
            out.append(("error", type(e).__name__, str(e)))
    return out


def test_cached_header_blocks_decode_as_hpack_does():
    """The caching decoder against hpack's on the same blocks in turn: Envoy's first block (a
    size update and literals with indexing), the repeated block (kept, then served from the
    cache), a block that adds an entry (every later reference shifts: the kept decoding is
    stale and must not be served), the repeated block again, a size update to 0 (the table
    emptied: the repeated block's references are now invalid and must raise)."""
    from hpack import Decoder

    blocks = [_envoy_first_block(), ENVOY_BLOCK, ENVOY_BLOCK, INDEXING_BLOCK, ENVOY_BLOCK, ENVOY_BLOCK, INDEXING_BLOCK]
    blocks += [ENVOY_BLOCK, b"\x20\x83\x86\x84", ENVOY_BLOCK, b"\x83\x86\x84", b"\x83\x86\x84"]
    decoder = h2compat._CachingDecoder(65536)
    hits = []
    real = decoder.cached
    decoder.cached = lambda data: hits.append(real(data)) or hits[-1]
    got = _decode_all(decoder, blocks)
    assert got == _decode_all(Decoder(), blocks)
    assert got[1][1] == got[2][1] == ENVOY_HEADERS and got[4][1] != ENVOY_HEADERS and got[9][0] == "error"
    served = [b is not None for b in hits]
    assert served == [False, False, True, False, False, True, False, False, False, False, False, True]


def test_cached_header_blocks_respect_the_limits_h2_sets():
    """A kept block is decoded again, raising as hpack does, once h2 lowers the header-list size
    limit below it (a MAX_HEADER_LIST_SIZE setting acknowledged) or the table's allowed size below
    the table's size (a HEADER_TABLE_SIZE setting the client has not applied yet)."""
    from hpack import Decoder

    first = _envoy_first_block()
    for limit in ("max_header_list_size", "max_allowed_table_size"):
        plain, caching = Decoder(), h2compat._CachingDecoder(65536)
        assert _decode_all(plain, [first, ENVOY_BLOCK, ENVOY_BLOCK]) == _decode_all(caching, [first, ENVOY_BLOCK, ENVOY_BLOCK])
        assert caching.cached(ENVOY_BLOCK) is not None
        for d in (plain, caching):
            setattr(d, limit, 200)
        got = _decode_all(caching, [ENVOY_BLOCK])
        assert got == _decode_all(plain, [ENVOY_BLOCK]) and got[0][0] == "error"


def test_header_block_cache_is_bounded():
    """At most ``BLOCKS_KEPT`` blocks (the latest), each at most ``BLOCK_MAX`` bytes: the client
    chooses them."""
    decoder = h2compat._CachingDecoder(65536)
    blocks = [b"\x83\x86\x84\x0f\x2b" + bytes([n]) + b"x" * n for n in range(1, 11)]  # literal user-agent, no indexing
    for block in blocks:
        decoder.decode(block, raw=True)
    assert list(decoder.blocks) == blocks[-h2compat.BLOCKS_KEPT :]
    from hpack.hpack import encode_integer

    long = b"\x83\x86\x84\x0f\x2b" + bytes(encode_integer(h2compat.BLOCK_MAX, 7)) + b"x" * h2compat.BLOCK_MAX
    assert decoder.decode(long, raw=True)[-1] == (b"user-agent", b"x" * h2compat.BLOCK_MAX)
    assert long not in decoder.blocks and len(decoder.blocks) == h2compat.BLOCKS_KEPT


def test_new_connections_get_the_caching_decoder():
    processor = Processor(parse({"listen": "127.0.0.1:1"}), [Recorder()])
    server = build_server(processor, "127.0.0.1:1")

    async def main() -> None:
        proto = server._protocol_factory()
        proto.connection_made(RecordingTransport())
        decoder = h2compat.h2_connection(proto).decoder
        assert isinstance(decoder, h2compat._CachingDecoder) and decoder.max_header_list_size == H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE
        assert h2compat.cache_header_blocks(proto) is False  # only once, on a fresh decoder

    asyncio.run(main())


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
END_STREAM, END_HEADERS, PADDED, PRIORITY, ACK = 0x1, 0x4, 0x8, 0x20, 0x1


def _frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def _headers(sid: int, block: bytes, flags: int = END_HEADERS) -> bytes:
    return _frame(1, flags, sid, block)


def _data(sid: int, n: int = 1) -> bytes:
    from tests.unit.test_processor import req_headers

    return _frame(0, 0, sid, _grpc_frame(req_headers()) * n)


def _rst(sid: int) -> bytes:
    return _frame(3, 0, sid, (8).to_bytes(4, "big"))  # CANCEL, as Envoy's


def _window_update(sid: int, n: int) -> bytes:
    return _frame(8, 0, sid, n.to_bytes(4, "big"))


def _opening() -> bytes:
    """Envoy's start of a connection: the preface, its settings, a window update, the first
    stream (its block a table size update and literals with indexing), then a stream with the
    repeated block (decoded by h2 and kept), the first reset."""
    out = PREFACE + _frame(4, 0, 0, (4).to_bytes(2, "big") + (1 << 20).to_bytes(4, "big")) + _window_update(0, 1 << 24)
    return out + _headers(1, _envoy_first_block()) + _data(1) + _headers(3, ENVOY_BLOCK) + _data(3, 2) + _rst(1)


def _compare(
    data: bytes, monkeypatch, splits=(1, 9, 100, 1 << 20, "frames", "2frames"), baseline=None, setup=None, untasked=False
) -> list[dict]:
    """Each cut of ``data`` through the fast path and through plain h2 (cut the same way, or
    as ``baseline``): the same state; the fast path's state and what it took, per cut."""
    out = []
    for split in splits:
        fast, taken = _receive(data, split, True, monkeypatch, setup=setup, untasked=untasked)
        slow, _ = _receive(data, split if baseline is None else baseline, False, monkeypatch, setup=setup, untasked=untasked)
        assert fast == slow, split
        out.append({"split": split, "state": fast, **taken})
    return out


def test_new_streams_headers_past_h2_leave_the_same_state(monkeypatch):
    """Envoy's HEADERS for new streams, interleaved with their DATA, resets, window updates, a
    ping, settings and their acknowledgment, and HEADERS h2 must take: PRIORITY and PADDED
    flags, END_STREAM, a block split over CONTINUATION, a block with a content-length (kept, but
    h2 must check it), the same through the fast path and plain h2 at every cut; read whole
    frames at a time, the new streams with the kept block open past h2."""
    cl_block = ENVOY_BLOCK + b"\x0f\x0d\x015"  # content-length: 5, literal without indexing
    data = _opening()
    data += _headers(5, ENVOY_BLOCK) + _data(5) + _frame(6, 0, 0, b"12345678") + _window_update(5, 1000)
    data += _frame(4, 0, 0, (4).to_bytes(2, "big") + (1 << 21).to_bytes(4, "big")) + _frame(4, ACK, 0)
    data += _headers(7, ENVOY_BLOCK) + _data(7, 3) + _rst(3)
    data += _headers(9, b"\x00\x00\x00\x03\x10" + ENVOY_BLOCK, END_HEADERS | PRIORITY) + _data(9)
    data += _headers(11, b"\x03" + ENVOY_BLOCK + b"\x00" * 3, END_HEADERS | PADDED) + _data(11)
    data += _headers(13, ENVOY_BLOCK, END_HEADERS | END_STREAM)
    data += _headers(15, ENVOY_BLOCK[:20], 0) + _frame(9, END_HEADERS, 15, ENVOY_BLOCK[20:]) + _data(15)
    data += _headers(17, cl_block) + _headers(19, cl_block) + _rst(5)
    data += _headers(21, ENVOY_BLOCK) + _data(21) + _rst(7) + _rst(21)
    runs = _compare(data, monkeypatch)
    state = runs[0]["state"]
    assert [sid for sid, _ in state["accepted"]] == list(range(1, 23, 2))
    assert all(headers == [(n.decode(), v.decode()) for n, v in ENVOY_HEADERS] for _, headers in state["accepted"][1:8])
    assert state["streams"][19][0]["_expected_content_length"] == 5 and not state["closed"]  # h2 read the content-length
    for run in runs:
        if isinstance(run["split"], str) or run["split"] == 1 << 20:
            assert run["headers"] == 3 and run["data"] > 0  # streams 5, 7, 21
        elif run["split"] == 1:
            assert run["headers"] == 0  # a frame never arrives whole: all of it through h2


def _accepted(run: dict) -> dict:
    return dict(run["state"]["accepted"])


def test_a_block_that_changes_the_table_is_never_served_from_the_cache(monkeypatch):
    """A block with incremental indexing (twice: it changes the table each time) shifts every
    reference: Envoy's repeated block, kept before, must now decode to other headers (h2 reads
    them, and the kept decoding is dropped); so must a table size update (to the same size);
    once a block is decoded at the new table it is kept and served again."""
    data = _opening() + _headers(5, ENVOY_BLOCK) + _data(5)
    data += _headers(7, INDEXING_BLOCK) + _headers(9, ENVOY_BLOCK) + _data(9)
    data += _headers(11, INDEXING_BLOCK) + _headers(13, ENVOY_BLOCK) + _headers(15, ENVOY_BLOCK) + _data(15)
    data += _headers(17, b"\x3f\xe1\x1f\x83\x86\x84") + _headers(19, ENVOY_BLOCK) + _headers(21, ENVOY_BLOCK) + _data(21)
    runs = _compare(data, monkeypatch)
    accepted = _accepted(runs[0])
    assert ("x-new", "v") not in accepted[5] and ("x-new", "v") in accepted[9]
    assert accepted[13] == accepted[15] != accepted[9] and accepted[19] == accepted[21] == accepted[15]
    whole = [run for run in runs if run["split"] in ("frames", 1 << 20)]
    assert all(run["headers"] == 3 for run in whole)  # 5, 15, 21: each after the block was decoded at that table


ERROR_SPLITS = (1, "frames", "2frames", 1 << 20)  # against plain h2 fed one frame per read: see below


def _compare_error(data: bytes, monkeypatch, setup=None) -> list[dict]:
    """A protocol error closes the connection; the frames before it in the same read were
    handled one by one, as h2 would if each came in a read of its own (plain grpclib drops the
    events of a read that ends in an error): so the fast path at frame-aligned cuts (or byte by
    byte, where it leaves every frame to h2) against plain h2 fed one frame per read."""
    runs = _compare(data, monkeypatch, splits=ERROR_SPLITS, baseline="frames", setup=setup)
    for run in runs:
        assert run["state"]["closed"] and run["state"]["unsent"][-17:-13] == b"\x00\x00\x08\x07"  # h2's GOAWAY
    return runs


def _goaway_error(run: dict) -> int:
    return int.from_bytes(run["state"]["unsent"][-4:], "big")


def test_a_table_size_update_to_zero_makes_kept_blocks_invalid(monkeypatch):
    """After a size update to 0 (the table emptied) Envoy's repeated block refers to entries that
    are gone: h2 fails the connection, and so must the fast path, which had
    the block kept."""
    data = _opening() + _headers(5, ENVOY_BLOCK) + _data(5) + _headers(7, b"\x20\x83\x86\x84") + _headers(9, ENVOY_BLOCK) + _data(9)
    runs = _compare_error(data, monkeypatch)
    assert {_goaway_error(run) for run in runs} == {1}  # PROTOCOL_ERROR (h2's for any HPACK error)
    assert sorted(_accepted(runs[-1])) == [1, 3, 5, 7] and runs[-1]["headers"] == 1


def test_a_kept_block_over_a_lowered_header_list_limit_fails_as_h2_does(monkeypatch):
    """The server lowers MAX_HEADER_LIST_SIZE; once the client acknowledges it, Envoy's repeated
    block (kept, ~430 bytes as hpack counts it) is over the limit: h2 fails the connection
    (ENHANCE_YOUR_CALM), and so must the fast path."""
    from h2.settings import SettingCodes

    def lower(conn) -> None:
        conn.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 200})

    settings_ack = _frame(4, ACK, 0)
    data = _opening() + _headers(5, ENVOY_BLOCK) + _data(5) + settings_ack + _headers(7, ENVOY_BLOCK) + _data(7)
    runs = _compare_error(data, monkeypatch, setup=lower)
    assert {_goaway_error(run) for run in runs} == {11}  # ENHANCE_YOUR_CALM
    assert sorted(_accepted(runs[-1])) == [1, 3, 5] and runs[-1]["headers"] == 1


def test_an_even_stream_id_fails_the_connection_as_h2_does(monkeypatch):
    data = _opening() + _headers(5, ENVOY_BLOCK) + _data(5) + _headers(6, ENVOY_BLOCK) + _data(5)
    runs = _compare_error(data, monkeypatch)
    assert {_goaway_error(run) for run in runs} == {1}  # PROTOCOL_ERROR
    assert sorted(_accepted(runs[-1])) == [1, 3, 5]


def test_a_skipped_stream_id_used_later_fails_the_connection_as_h2_does(monkeypatch):
    data = _opening() + _headers(7, ENVOY_BLOCK) + _data(7) + _headers(5, ENVOY_BLOCK) + _data(7)
    runs = _compare_error(data, monkeypatch)
    assert {_goaway_error(run) for run in runs} == {1}
    assert sorted(_accepted(runs[-1])) == [1, 3, 7]


def test_a_reset_stream_id_used_again_is_reset_as_h2_does(monkeypatch):
    """HEADERS on a stream the client reset: a stream error (RST_STREAM STREAM_CLOSED), the
    connection goes on, and the next new stream opens past h2."""
    data = _opening() + _headers(1, ENVOY_BLOCK) + _headers(5, ENVOY_BLOCK) + _data(5)
    runs = _compare(data, monkeypatch)
    for run in runs:
        assert not run["state"]["closed"] and _rst_frame(1, 5) in run["state"]["written"]
        assert sorted(_accepted(run)) == [1, 3, 5]
        if run["split"] in ("frames", 1 << 20):
            assert run["headers"] == 1


def _rst_frame(sid: int, code: int) -> bytes:
    return _frame(3, 0, sid, code.to_bytes(4, "big"))


def _resets() -> bytes:
    """Envoy's opening, then streams ended by RST_STREAM in every way a client can: after their
    DATA in the same read or alone, one reset twice, one after the client's END_STREAM (half
    closed), one with a flag set (h2 ignores RST_STREAM's flags), resets of an idle stream and
    of a stream h2 has forgotten (closed and counted out), and DATA on a reset stream (a stream
    error h2 answers with its own RST_STREAM)."""
    data = _opening() + _headers(5, ENVOY_BLOCK) + _data(5) + _rst(3) + _headers(7, ENVOY_BLOCK) + _data(7, 2)
    data += _rst(5) + _rst(5) + _data(7) + _headers(9, ENVOY_BLOCK, END_HEADERS | END_STREAM) + _rst(9)
    data += _headers(11, ENVOY_BLOCK) + _data(11) + _frame(3, 0x1, 11, (8).to_bytes(4, "big")) + _rst(13)
    data += _headers(15, ENVOY_BLOCK) + _rst(5) + _data(7) + _rst(7) + _data(7) + _headers(17, ENVOY_BLOCK) + _data(17)
    return data + _frame(6, 0, 0, b"12345678") + _rst(17) + _headers(19, ENVOY_BLOCK) + _data(19) + _rst(15)


def test_resets_past_h2_leave_the_same_state(monkeypatch):
    """``receive_frames`` takes Envoy's RST_STREAM of an open stream past h2 (the stream closed
    by the reset, the reset handler called with its id) and leaves every other reset to h2:
    the same h2 state (streams, their close reasons once counted out, windows), grpclib state
    and bytes written back (h2's RST_STREAM answers) as plain h2, at every cut."""
    runs = _compare(_resets(), monkeypatch)
    state = runs[0]["state"]
    assert not state["closed"] and _rst_frame(7, 5) in state["written"]  # DATA after the reset: h2's STREAM_CLOSED
    h2_streams = {sid: s[0] for sid, s in state["streams"].items() if s[0]}
    assert h2_streams[19]["state_machine"][1]["state"].name == "OPEN"
    assert h2_streams[15]["state_machine"][1]["state"].name == "CLOSED"  # kept until h2 next counts the open streams
    assert h2_streams[15]["state_machine"][1]["stream_closed_by"].name == "RECV_RST_STREAM"
    closed = dict(state["connection"][2])
    assert sorted(closed) == [1, 3, 5, 7, 9, 11, 17] and {c.name for c in closed.values()} == {"RECV_RST_STREAM"}
    for run in runs:
        if isinstance(run["split"], str) or run["split"] == 1 << 20:
            assert run["resets"] == 7  # each open stream's first reset but 11's (a flag set): 1, 3, 5, 9, 7, 17, 15
        elif run["split"] == 1:
            assert run["resets"] == 0  # a frame never arrives whole: all of it through h2


def test_resets_past_h2_end_streams_without_a_task_as_h2_does(monkeypatch):
    """As in production (ext_proc streams handled without a task): each message answered where
    it is read, each stream's call reported where its reset is taken; the same calls, replies
    and state as plain h2 fed one frame per read (so each message is answered before the reset
    that follows it is read, as the fast path does within a read)."""
    runs = _compare(_resets(), monkeypatch, splits=("frames", "2frames", 1 << 20), baseline="frames", untasked=True)
    for run in runs:
        state = run["state"]
        # every stream's call reported but 19's (open) and 9's (its END_STREAM gave it a task, cancelled by the reset: not run here)
        assert run["resets"] == 7 and len(state["calls"]) == 7 and state["exchanges"] == [9, 19]
        assert state["written"].count(h2compat.RESPONSE_HEADERS_BLOCK) == 7  # every stream with a message answered: 1, 3, 5, 7, 11, 17, 19


@pytest.mark.parametrize(
    ("reset", "error"),
    [
        (_frame(3, 0, 0, (8).to_bytes(4, "big")), 1),  # on stream 0: PROTOCOL_ERROR
        (_frame(3, 0, 5, (8).to_bytes(3, "big")), 6),  # 3 bytes: FRAME_SIZE_ERROR
        (_frame(3, 0, 5, (8).to_bytes(5, "big")), 6),  # 5 bytes
    ],
)
def test_a_malformed_reset_fails_the_connection_as_h2_does(reset, error, monkeypatch):
    """A RST_STREAM on stream 0 or of another length than 4 is a connection error: h2's, with
    its GOAWAY, through the fast path too (the open stream it names stays open)."""
    data = _opening() + _headers(5, ENVOY_BLOCK) + _data(5) + reset + _data(5) + _rst(5)
    runs = _compare_error(data, monkeypatch)
    assert {_goaway_error(run) for run in runs} == {error}
    for run in runs:
        assert run["state"]["streams"][5][0]["state_machine"][1]["state"].name == "OPEN"


def test_h2s_transitions_are_what_the_fast_path_does():
    """h2's transitions that ``_open_stream`` and ``_reset_stream`` do by hand: none for the open
    server connection receiving HEADERS or RST_STREAM; a new stream's request headers take it
    from IDLE to OPEN via ``request_received``; a received RST_STREAM closes a stream OPEN or
    half closed via ``stream_reset`` (which only records the reason and makes the event)."""
    from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
    from h2.stream import H2StreamStateMachine, StreamClosedBy, StreamInputs, StreamState, _transitions

    for received in (ConnectionInputs.RECV_HEADERS, ConnectionInputs.RECV_RST_STREAM):
        assert H2ConnectionStateMachine._transitions[(ConnectionState.SERVER_OPEN, received)] == (None, ConnectionState.SERVER_OPEN)
    assert _transitions[(StreamState.IDLE, StreamInputs.RECV_HEADERS)] == (H2StreamStateMachine.request_received, StreamState.OPEN)
    for state in h2compat._ACK_OPEN:
        assert _transitions[(state, StreamInputs.RECV_RST_STREAM)] == (H2StreamStateMachine.stream_reset, StreamState.CLOSED)
        machine = H2StreamStateMachine(5)
        machine.state, machine.client, machine.headers_received = state, False, True
        before = dict(vars(machine))
        [event] = machine.process_input(StreamInputs.RECV_RST_STREAM)
        assert event.stream_id == 5 and vars(machine) == {
            **before,
            "state": StreamState.CLOSED,
            "stream_closed_by": StreamClosedBy.RECV_RST_STREAM,
        }


def test_a_stream_opened_past_h2_makes_grpclibs_asyncio_objects_only_when_used(monkeypatch):
    """grpclib's processor would make each new stream's three events and receive buffer (a
    queue); a stream opened past h2 gets them when first read, as grpclib makes them, so a stream
    handled without a task (answered and reset where its frames are read) makes none, and one
    handed to a task finds the same attributes as on grpclib's own ``Stream``."""
    from grpclib.protocol import Buffer, Stream
    from h2.events import RequestReceived

    streams = []
    accept = _REAL["accept"]

    def recording(self, stream, headers, release_stream):
        streams.append(stream)
        accept(self, stream, headers, release_stream)

    monkeypatch.setattr(grpc_server._Handler, "accept", recording)
    processor = Processor(parse({"listen": "127.0.0.1:1"}), [Recorder()])
    server = build_server(processor, "127.0.0.1:1")
    lazy = ("window_updated", "headers_received", "trailers_received", "buffer")

    async def main() -> None:
        proto = server._protocol_factory()
        proto.connection_made(RecordingTransport())
        assert proto.processor.processors[RequestReceived] == proto.processor.process_request_received  # what _open_stream does
        for frame in _pieces(_opening() + _headers(5, ENVOY_BLOCK) + _data(5) + _rst(5), "frames"):
            proto.data_received(frame)
        first, _third, fifth = streams
        assert first.__class__ is Stream and fifth.__class__ is h2compat._ServerStream  # 1 through h2, 5 past it
        assert not [name for name in lazy[:3] if name in vars(fifth)] and isinstance(vars(fifth)["buffer"], MessageBuffer)
        # made on first use, as grpclib makes them: the same attributes, of the same kinds
        grpclib_made = {k: v.__class__ for k, v in vars(first).items() if k != "data_received"}  # (counted: 0 on the class)
        ours = h2compat._ServerStream(proto.connection, h2compat.h2_connection(proto), proto.connection._transport, 7)
        for name in lazy:
            getattr(ours, name)
        assert {k: v.__class__ for k, v in vars(ours).items()} == {**grpclib_made, "buffer": Buffer}
        assert ours.buffer._ack_callback.func == proto.connection.ack and ours.buffer._ack_callback.args == (7,)
        assert ours.window_updated is ours.window_updated and not ours.window_updated.is_set()

    asyncio.run(main())


def test_streams_opened_from_a_kept_block_share_its_metadata_decoded_once(monkeypatch):
    """The gRPC metadata of a stream opened past h2 is kept on its header block: the block's
    first stream decodes it, every later one gets the same (read-only) metadata without
    decoding or looking up its headers; each stream h2 opened (a connection's first two, the
    second decoding the block that is kept) decodes its own, which nothing keeps once the
    stream ended."""
    import gc
    import weakref

    computed = []
    real = grpc_server._plain_metadata
    monkeypatch.setattr(grpc_server, "_plain_metadata", lambda headers: computed.append([tuple(h) for h in headers]) or real(headers))
    recorder = Recorder()
    processor = Processor(parse({"listen": "127.0.0.1:1"}), [recorder])
    opened = []  # the metadata each stream's Processor stream was opened with, weakly
    open_stream = processor.open_stream
    processor.open_stream = lambda metadata: opened.append(weakref.ref(metadata)) or open_stream(metadata)  # type: ignore[method-assign]
    server = build_server(processor, "127.0.0.1:1")

    async def main() -> None:
        proto = server._protocol_factory()
        proto.connection_made(RecordingTransport())
        data = _opening() + b"".join(_headers(sid, ENVOY_BLOCK) + _data(sid) + _rst(sid) for sid in (5, 7, 9))
        for frame in _pieces(data, "frames"):
            proto.data_received(frame)
        block = h2compat.h2_connection(proto).decoder.blocks[ENVOY_BLOCK]
        envoy = [(n.decode(), v.decode()) for n, v in ENVOY_HEADERS]
        # streams 1 and 3 (through h2) each decoded their own, then the block's first (5)
        assert len(opened) == 5 and len(computed) == 3 and computed[1:] == [envoy, envoy]
        assert opened[2]() is opened[3]() is opened[4]() is block.derived  # 5, 7, 9
        gc.collect()
        assert opened[0]() is None  # stream 1 (reset in _opening): its metadata is kept by nothing
        assert dict(block.derived) == {"x-forwarded-for": "192.0.2.2", "x-envoy-internal": "true"}
        with pytest.raises(TypeError):
            block.derived["x-envoy-internal"] = "false"  # shared by the block's streams: read-only
        assert processor.counters.active == 1 and len(recorder.calls) == 4  # 3 open; 1 (its reset in _opening), 5, 7, 9 reported

    asyncio.run(main())


def test_a_blocks_derived_value_is_dropped_when_its_headers_change_form():
    """A kept block hands out its request headers as h2 would (decoded with a str
    ``header_encoding``, hpack's bytes otherwise), a new list each time; what the server derived
    from them is dropped when they are handed out in another form."""
    from hpack import Decoder

    block = h2compat._Block(list(Decoder().decode(_envoy_first_block(), raw=True)))
    first = block.request_headers("ascii")
    classes = [h.__class__.__name__ for h in first]
    assert block.derived is h2compat.NOT_DERIVED and classes[-3:-1] == ["HeaderTuple", "NeverIndexedHeaderTuple"]
    block.derived = "metadata"
    again = block.request_headers("ascii")
    assert again == first and again is not first and block.derived == "metadata"
    raw = block.request_headers(None)
    assert raw == block.headers and raw is not block.headers and block.derived is h2compat.NOT_DERIVED
    block.derived = "other"
    assert block.request_headers("utf-8") == first and block.derived is h2compat.NOT_DERIVED


def test_header_tuple_classes_are_kept_past_h2(monkeypatch):
    """A never-indexed field (a literal the client asks never to be indexed, e.g. a credential)
    reaches grpclib as hpack's ``NeverIndexedHeaderTuple`` from a kept block too."""
    never = ENVOY_BLOCK + b"\x10\x01x\x01y"  # literal never indexed, new name
    data = _opening() + _headers(5, never) + _data(5) + _headers(7, never) + _data(7) + _rst(5) + _rst(7)
    runs = _compare(data, monkeypatch)
    for run in runs:
        classes = run["state"]["header_classes"]
        assert [c.__name__ for c in classes[-1]][-1] == "NeverIndexedHeaderTuple"
        if run["split"] == "frames":
            assert run["headers"] == 1  # 7, from the kept block


@pytest.mark.parametrize("option", ["validate_inbound_headers", "normalize_inbound_headers"])
def test_a_connection_that_validates_headers_opens_streams_through_h2(option, monkeypatch):
    """Streams are opened past h2 only where h2 would neither validate nor normalise the
    received headers (grpclib's configuration): otherwise h2 does it, as before."""
    import copy

    def validating(conn) -> None:
        conn.config = copy.copy(conn.config)
        setattr(conn.config, option, True)  # (through h2's descriptor, as a user would)

    block = b"\x83\x86\x84\x01\x01x"  # POST, http, /, literal :authority without indexing: valid, kept
    data = PREFACE + _frame(4, 0, 0) + b"".join(_headers(sid, block) + _data(sid) for sid in (1, 3, 5)) + _rst(3)
    runs = _compare(data, monkeypatch, setup=validating)
    assert all(run["headers"] == 0 for run in runs) and any(run["data"] for run in runs)
    assert sorted(_accepted(runs[0])) == [1, 3, 5] and not runs[0]["state"]["closed"]
    without = _compare(data, monkeypatch, splits=("frames",))  # (the same bytes are taken past h2 without validation)
    assert without[0]["headers"] == 2


def test_the_open_streams_count_past_h2_is_h2s(monkeypatch):
    """The server lowers MAX_CONCURRENT_STREAMS to 3; once the client acknowledges it (the
    server's two earlier SETTINGS first), a stream opened while 3 are open (one half closed) is
    a connection error in h2, and in the fast path too; one opened after a reset (the reset
    stream forgotten by the count) is taken past h2."""
    from h2.settings import SettingCodes

    def lower(conn) -> None:
        conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 3})

    data = _opening() + _frame(4, ACK, 0) * 3 + _headers(5, ENVOY_BLOCK) + _headers(7, ENVOY_BLOCK, END_HEADERS | END_STREAM)
    data += _rst(3) + _headers(9, ENVOY_BLOCK) + _data(9) + _headers(11, ENVOY_BLOCK) + _data(9)
    runs = _compare_error(data, monkeypatch, setup=lower)
    assert {_goaway_error(run) for run in runs} == {1}  # PROTOCOL_ERROR (h2's TooManyStreamsError)
    for run in runs:
        assert sorted(_accepted(run)) == [1, 3, 5, 7, 9]
        if run["split"] != 1:
            assert run["headers"] == 2  # 5 and 9


@pytest.mark.parametrize("unacked", [0, 5])
@pytest.mark.parametrize("closing", [False, True])
def test_a_stream_released_past_grpclib_does_what_grpclibs_release_does(unacked, closing):
    """The release function of a stream opened past h2 (``_register``) and grpclib's
    (``EventsProcessor.register``) do the same to the connection: the stream forgotten, the
    close waiter set, the bytes the buffer did not acknowledge handed back unless the connection
    is closing."""
    from grpclib.protocol import EventsProcessor

    class Buffer:
        def unacked_size(self) -> int:
            return unacked

    class Connection:
        def __init__(self) -> None:
            self.stream_close_waiter = asyncio.Event()
            self.acks: list[tuple[int, int]] = []

        def is_closing(self) -> bool:
            return closing

        def ack(self, stream_id: int, size: int) -> None:
            if size:  # grpclib's: acknowledging nothing does nothing
                self.acks.append((stream_id, size))

    class Stream:
        id = 7
        buffer = Buffer()

    class Processor:
        def __init__(self) -> None:
            self.connection = Connection()
            self.streams: dict = {}

    def run(register) -> tuple:
        p = Processor()
        release = register(p, Stream())
        registered = dict(p.streams)
        release()
        return registered.keys(), p.streams, p.connection.stream_close_waiter.is_set(), p.connection.acks

    ours = run(lambda p, s: h2compat._register(p, p.connection, s, s.id))
    assert ours == run(EventsProcessor.register)
    assert ours[2] and ours[3] == ([] if closing or not unacked else [(7, unacked)])


def test_the_constant_trailers_are_what_grpclib_sends():
    """The pre-encoded trailers read as the header lists grpclib's ``send_trailing_metadata``
    hands h2 for status OK, with and without response headers sent before (trailers-only), and
    leave a decoder's dynamic table empty (so the encoder's, which they bypass, stays in step)."""
    from grpclib.const import Cardinality, Status
    from grpclib.server import Stream
    from hpack import Decoder

    from extproc.server.grpc_server import _Codec

    sent = []

    class _Recording:
        connection = type("C", (), {"get_peer": lambda self: None})()

        async def send_headers(self, headers, end_stream=False):
            sent.append((list(headers), end_stream))

    for initial_sent in (False, True):
        stream = Stream(
            _Recording(),
            "/m",
            Cardinality.STREAM_STREAM,
            bytes,
            bytes,
            codec=_Codec(),
            status_details_codec=None,
            dispatch=h2compat.server_events(),
        )
        stream._send_initial_metadata_done = initial_sent
        asyncio.run(stream.send_trailing_metadata(status=Status.OK))
    [(trailers_only, end1), (trailers, end2)] = sent
    assert end1 and end2
    decoder = Decoder()
    assert decoder.decode(h2compat.TRAILERS_ONLY_OK_BLOCK) == trailers_only
    assert decoder.decode(h2compat.TRAILERS_OK_BLOCK) == trailers
    assert len(decoder.header_table.dynamic_entries) == 0


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in ``data`` (no preface: a server's)."""
    out, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 3], "big")
        kind, flags, sid = data[offset + 3], data[offset + 4], int.from_bytes(data[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, sid, data[offset + 9 : offset + 9 + size]))
        offset += 9 + size
    return out


def _observe_run(monkeypatch, now: bool, half_closed: bool, reply_first: bool) -> dict:
    """One observability-mode stream (stream 1, ended by the server at the response's end), then
    one default-mode stream the client ends (stream 3: its trailers through h2's encoder), on a
    server whose trailers go out now (``send_trailers_now``) or, as before, from grpclib's task
    through h2: what h2, grpclib and the Processor are left with, and what the client reads."""
    from h2.config import H2Configuration
    from h2.events import DataReceived, ResponseReceived, StreamEnded, TrailersReceived

    from tests.unit.test_processor import CHAT_JSON, body, headers, req_headers

    real = h2compat.send_trailers_now
    ended_now = []

    def sending(ps):
        ok = now and real(ps)
        ended_now.append(ok)
        return ok

    monkeypatch.setattr(grpc_server, "_send_trailers_now", sending)
    tasks = []
    start_task = grpc_server._Handler.start_task
    monkeypatch.setattr(grpc_server._Handler, "start_task", lambda self, ps, *a: (tasks.append(ps.id), start_task(self, ps, *a))[1])
    c = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    c.send_headers(1, REQUEST_HEADERS)
    msgs = [
        req_headers(),
        headers("response_headers", **{":status": "200", "content-type": "application/json"}),
        body("response_body", CHAT_JSON, end=True),
    ]
    for m in msgs[1 if reply_first else 0 :]:
        m.observability_mode = True
    c.send_data(1, b"".join(_grpc_frame(m) for m in msgs), end_stream=half_closed)
    first = c.data_to_send()
    c.send_headers(3, REQUEST_HEADERS)
    c.send_data(3, _grpc_frame(req_headers()), end_stream=True)
    second = c.data_to_send()
    recorder = Recorder()
    processor = Processor(parse({"listen": "127.0.0.1:1"}), [recorder])
    server = build_server(processor, "127.0.0.1:1")
    out: dict = {}

    async def main() -> None:
        proto = server._protocol_factory()
        transport = RecordingTransport()
        proto.connection_made(transport)
        proto.data_received(first)
        await _wait(lambda: len(recorder.calls) == 1)
        conn = h2compat.h2_connection(proto)
        out["stream 1"] = _h2_stream_state(conn.streams[1])
        out["grpclib streams"] = sorted(proto.processor.streams)
        out["open"] = (processor.counters.active, server.cap.open, len(server.exchanges), len(proto.handler.untasked))
        proto.data_received(second)
        await _wait(lambda: len(recorder.calls) == 2)
        await asyncio.sleep(0.01)
        proto.connection._transport.flush()
        out["encoder"] = len(conn.encoder.header_table.dynamic_entries)
        written = bytes(transport.written)
        out["frames"] = [(kind, flags, sid, payload if kind != 1 else None) for kind, flags, sid, payload in _frames(written)]
        events = []
        for ev in c.receive_data(written):
            if isinstance(ev, (ResponseReceived, TrailersReceived)):
                events.append((ev.__class__.__name__, ev.stream_id, list(ev.headers)))
            elif isinstance(ev, DataReceived):
                events.append(("DataReceived", ev.stream_id, ev.data))
            elif isinstance(ev, StreamEnded):
                events.append(("StreamEnded", ev.stream_id))
        out["client"] = events
        out["calls"] = [(call.outcome, call.obs.usage.total_tokens) for call in recorder.calls]
        out["tasks"] = tasks[:]
        out["ended now"] = ended_now[:]

    asyncio.run(main())
    return out


@pytest.mark.parametrize("half_closed", [False, True], ids=["envoy-open", "envoy-half-closed"])
@pytest.mark.parametrize("reply_first", [False, True], ids=["trailers-only", "after-a-reply"])
def test_trailers_sent_now_leave_the_state_h2_and_grpclib_leave(half_closed, reply_first, monkeypatch):
    """The server's end of an observability-mode stream without a task (``send_trailers_now``,
    then the exchange closed where its last message is handled) against grpclib's request
    handler sending them through h2 from the stream's task: h2's stream (state machine included:
    half closed, or closed by our END_STREAM when Envoy had ended its side), grpclib's streams,
    the call's report and the frames written are the same, byte for byte but for the HPACK block
    of the trailers, which the client's h2 reads as the same headers; and a later header block
    h2 encodes (another stream's trailers) still reads right (the constant block left the
    encoder's table alone, h2's own indexes ``grpc-status``)."""
    fast = _observe_run(monkeypatch, True, half_closed, reply_first)
    slow = _observe_run(monkeypatch, False, half_closed, reply_first)
    assert fast["ended now"] == [True] and slow["ended now"] == [False]
    assert fast["tasks"] == [3] and slow["tasks"] == [1, 3]  # no task for the observability-mode stream
    assert fast["encoder"] == 1  # stream 3's ``grpc-status`` (h2's); the constant blocks indexed nothing
    for key in ("stream 1", "grpclib streams", "open", "frames", "client", "calls"):
        assert fast[key] == slow[key], key
    machine = fast["stream 1"]["state_machine"][1]
    assert machine["state"] == (h2compat.StreamState.CLOSED if half_closed else h2compat.StreamState.HALF_CLOSED_LOCAL)
    assert machine["trailers_sent" if reply_first else "headers_sent"] is True
    assert fast["open"] == (0, 0, 0, 0) and fast["calls"][0] == (OK, 12)
    trailers = [e for e in fast["client"] if e[1] == 1 and e[0] in ("TrailersReceived", "ResponseReceived")]
    expected = (
        [("grpc-status", "0")]
        if reply_first
        else [(":status", "200"), ("content-type", h2compat.RESPONSE_CONTENT_TYPE), ("grpc-status", "0")]
    )
    assert trailers[-1][2] == expected and ("StreamEnded", 1) in fast["client"] and ("StreamEnded", 3) in fast["client"]


def _ps(conn: H2Connection, stream_id: int, ready: bool = True):
    """A grpclib transport-level stream's fields ``send_trailers_now`` reads, on ``conn``."""
    from types import SimpleNamespace

    written = bytearray()
    event = asyncio.Event()
    if ready:
        event.set()
    connection = SimpleNamespace(write_ready=event, headers_send_process=lambda: None)
    return SimpleNamespace(
        _h2_connection=conn, id=stream_id, _transport=SimpleNamespace(write=written.extend), connection=connection
    ), written


def _server_with_stream(state: str = "open") -> H2Connection:
    from h2.config import H2Configuration

    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, REQUEST_HEADERS, end_stream=state == "half-closed")
    server = H2Connection(H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return server


@pytest.mark.parametrize("case", ["reset", "trailers sent", "table size update", "paused", "connection closed", "unknown stream"])
def test_trailers_that_cannot_go_now_are_left_to_h2(case):
    """Whatever h2 would refuse or hold back, ``send_trailers_now`` leaves alone (False, nothing
    written, nothing changed), for grpclib's task to send through h2 (or find the stream gone):
    a stream already reset, trailers already sent, a pending HPACK table size update (it must
    open the next block, which h2 writes), a paused transport, a closed connection."""
    conn = _server_with_stream()
    ps, written = _ps(conn, 1, ready=case != "paused")
    if case == "reset":
        conn.reset_stream(1)
    elif case == "trailers sent":
        conn.send_headers(1, [(":status", "200")])
        conn.send_headers(1, [("grpc-status", "0")], end_stream=True)
    elif case == "table size update":
        conn.encoder.header_table_size = 256
    elif case == "connection closed":
        conn.close_connection()
    elif case == "unknown stream":
        ps.id = 3
    conn.data_to_send()
    before = _h2_stream_state(conn.streams[1])
    assert h2compat.send_trailers_now(ps) is False
    assert not written and _h2_stream_state(conn.streams[1]) == before


def test_trailers_sent_now_flush_what_h2_had_queued_first():
    """Bytes h2 queued before (a WINDOW_UPDATE, a PING ack) go out ahead of the trailers, in one
    write, as h2's ``send_headers`` + ``data_to_send`` would order them."""
    from h2.config import H2Configuration
    from h2.events import StreamEnded

    client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.send_headers(1, REQUEST_HEADERS)
    server = H2Connection(H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.data_to_send()
    server.ping(b"12345678")
    ps, written = _ps(server, 1)
    assert h2compat.send_trailers_now(ps) is True
    frames = _frames(bytes(written))
    assert [(kind, flags, sid) for kind, flags, sid, _ in frames] == [(6, 0, 0), (1, 0x5, 1)]
    assert not server._data_to_send
    events = client.receive_data(bytes(written))
    assert any(isinstance(e, StreamEnded) and e.stream_id == 1 for e in events)


def test_a_stream_past_the_windows_never_finds_them_closed():
    """A stream carrying more streamed chunks than the server's flow-control windows hold (4
    MiB each, grpclib's defaults), each message handled where its frame arrives: the server
    hands the bytes back in batches (h2's WINDOW_UPDATE at half a window, counted on the window
    managers in between: ``h2compat.acknowledger``), so Envoy's windows never close: before each
    message the client has room for it, and every message is answered."""
    import h2.events
    from h2.config import H2Configuration

    from extproc._pb.envoy_api import external_processor_pb2 as pb
    from tests.unit.test_processor import body, headers, req_headers

    def framed(m: pb.ProcessingRequest) -> bytes:
        data = m.SerializeToString()
        return b"\0" + len(data).to_bytes(4, "big") + data

    chunk = framed(body("response_body", b'data: {"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n'))
    chunks = 3 * (4 << 20) // len(chunk)  # three windows' worth
    transport = RecordingTransport()

    async def main() -> tuple[int, int]:
        server = build_server(Processor(parse({}), []), "127.0.0.1:1")
        proto = server._protocol_factory()
        proto.connection_made(transport)
        client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        client.initiate_connection()
        request = [(":method", "POST"), (":scheme", "http"), (":path", grpc_server.PROCESS), (":authority", "x")]
        client.send_headers(1, request + [("content-type", "application/grpc"), ("te", "trailers")])
        replies = updates = 0
        received = b""

        def exchange() -> None:
            nonlocal replies, updates, received
            proto.data_received(client.data_to_send())
            out = bytes(transport.written)
            transport.written.clear()
            for event in client.receive_data(out):
                if isinstance(event, h2.events.DataReceived):
                    received += event.data
                    while len(received) >= 5 and len(received) >= 5 + int.from_bytes(received[1:5], "big"):
                        received = received[5 + int.from_bytes(received[1:5], "big") :]  # one reply
                        replies += 1
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.WindowUpdated) and event.stream_id == 0:
                    updates += 1

        response = headers("response_headers", **{":status": "200", "content-type": "text/event-stream"})
        for m in (req_headers(), body("request_body", b'{"model":"gpt-4o","stream":true}', True), response):
            client.send_data(1, framed(m))
            exchange()
        replies = 0
        for _ in range(chunks):
            assert client.local_flow_control_window(1) >= len(chunk), "the client's window closed"
            client.send_data(1, chunk)
            exchange()
        (exchanged,) = server.exchanges.values()
        assert not exchanged.tasked
        return replies, updates

    replies, updates = asyncio.run(main())
    assert replies == chunks
    assert 2 <= updates <= 8  # handed back in batches, not per message
