"""The gRPC server, driven in this process by a grpcio client: replies, metadata, health
transitions, cancellation and drain behaviour, on TCP and on a unix socket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.call import NO_RESPONSE, OK
from extproc.core.config import ConfigError, parse
from extproc.devtools.dev import free_port
from extproc.server import h2compat
from extproc.server import worker as server_mod
from extproc.server.grpc_server import CLOSED_STREAMS_KEPT, StreamCap, build_server
from extproc.server.health import Health
from extproc.server.processor import Processor
from extproc.server.replies import CONTINUE_REQUEST_HEADERS
from tests.support.transport import RecordingTransport
from tests.unit.test_processor import Recorder
from tests.unit.test_processor import headers as _headers

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


REQ = _headers("request_headers", True, **{":path": "/v1/chat/completions", ":method": "GET", ":authority": "api.openai.com"})
RESP = _headers("response_headers", True, **{":status": "200", "content-type": "application/json"})


class Running:
    """A worker's server on its own loop in this thread."""

    def __init__(self, address: str, config_extra: dict | None = None) -> None:
        self.config = parse({"listen": address, **(config_extra or {})})
        self.recorder = Recorder()
        self.processor = Processor(self.config, [self.recorder])
        self.server = build_server(self.processor, address, tls=self.config.tls)
        self.health = Health(self.server)

    async def __aenter__(self) -> Running:
        await self.health.not_ready()
        await self.server.start()
        await self.health.serving()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)


def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def _stream(channel: grpc.aio.Channel, metadata: tuple = ()):
    call = channel.stream_stream(
        METHOD, request_serializer=lambda m: m.SerializeToString(), response_deserializer=pb.ProcessingResponse.FromString
    )
    return call(metadata=metadata)


async def _in_flight(channel: grpc.aio.Channel):
    """A stream whose request headers were sent and answered: an HTTP exchange in progress."""
    call = _stream(channel)
    await call.write(REQ)
    await call.read()
    return call


async def _wait(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


@pytest.fixture(params=["tcp", "unix"])
def address(request, tmp_path) -> str:
    return f"127.0.0.1:{free_port()}" if request.param == "tcp" else f"unix:{tmp_path}/extproc.sock"


def test_process_replies_and_metadata(address):
    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            call = _stream(ch, metadata=(("x-llm-provider", "acme"), ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")))
            await call.write(REQ)
            first = await call.read()
            assert first.SerializeToString() == CONTINUE_REQUEST_HEADERS
            await call.write(RESP)
            second = await call.read()
            assert second.HasField("response_headers")
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            await _wait(lambda: r.recorder.calls)
            [c] = r.recorder.calls
            assert c.provider == "acme" and c.outcome == OK and c.trace_context["traceparent"].startswith("00-111")
            assert r.processor.counters.active == 0

    asyncio.run(main())


def test_client_cancel_reports_the_call_once():
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            call = await _in_flight(ch)
            await _wait(lambda: r.processor.counters.active == 1)
            call.cancel()  # Envoy resets the stream: the client hung up
            await _wait(lambda: r.processor.counters.active == 0)
            await asyncio.sleep(0.1)
            assert [c.outcome for c in r.recorder.calls] == [NO_RESPONSE]

    asyncio.run(main())


def test_a_stream_is_handled_without_a_task_and_ends_where_its_reset_arrives():
    """The common ext_proc stream: opened where its HEADERS arrive, each message answered where
    its frame arrives, and closed where Envoy's RST_STREAM arrives: no task at any point, the call
    reported once, its stream-cap slot given back."""
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            call = await _in_flight(ch)
            await call.write(RESP)
            assert (await call.read()).HasField("response_headers")
            [proto] = r.server._protocols
            assert not proto.handler._tasks and len(r.server.exchanges) == 1 and r.server.cap.open == 1
            assert r.processor.counters.active == 1
            call.cancel()
            await _wait(lambda: r.processor.counters.active == 0)
            assert not r.server.exchanges and r.server.cap.open == 0 and not proto.handler.untasked
            await asyncio.sleep(0.1)
            assert [c.outcome for c in r.recorder.calls] == [OK]

    asyncio.run(main())


@pytest.mark.parametrize("claims", [False, True])
def test_streamed_chunks_with_envoys_metadata_context_are_read_from_their_bytes(monkeypatch, claims):
    """With forwarding namespaces configured (the generated Envoy config), Envoy adds a
    ``metadata_context`` to every message, an empty one when there is nothing to forward: each
    streamed chunk after the request headers still reaches ``Stream.handle_body_chunk`` from its
    bytes (not protobuf's parse and ``Stream.handle``), and the call keeps what the first message
    forwarded."""
    from extproc.server.processor import Stream

    address = f"127.0.0.1:{free_port()}"
    read: list[bytes] = []
    handle_body_chunk = Stream.handle_body_chunk

    def spy(self, body: bytes) -> bytes | None:
        read.append(bytes(body))
        return handle_body_chunk(self, body)

    monkeypatch.setattr(Stream, "handle_body_chunk", spy)

    def context(m: pb.ProcessingRequest) -> pb.ProcessingRequest:
        m.metadata_context.SetInParent()
        if claims:
            m.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].fields["sub"].string_value = "team-a"
        return m

    chunks = [b'data: {"choices":[{"index":0,"delta":{"content":"%d"}}]}\n\n' % i for i in range(5)]
    messages = [
        _headers("request_headers", **{":path": "/v1/chat/completions", ":method": "POST", ":authority": "api.openai.com"}),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model":"gpt-4o","stream":true}', end_of_stream=True)),
        _headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
    ] + [pb.ProcessingRequest(response_body=pb.HttpBody(body=c)) for c in chunks]

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            call = _stream(ch)
            for m in messages:
                await call.write(context(m))
                await call.read()
            call.cancel()
            await _wait(lambda: len(r.recorder.calls) == 1)
            (c,) = r.recorder.calls
            assert c.response_bytes == sum(map(len, chunks))
            assert ("team-a" in str(c.forwarded)) is claims

    asyncio.run(main())
    assert read == chunks


def test_each_stream_reads_its_own_metadata_and_none_is_kept_once_it_ended(monkeypatch):
    """A stream reads the gRPC metadata of its own headers (the provider its client named, the
    same again for the same headers), and the server keeps none once the stream ended, however
    many distinct header lists a client sends: only a kept header block holds the metadata its
    streams share (at most ``h2compat.BLOCKS_KEPT`` blocks per connection)."""
    import gc
    import weakref

    address = f"127.0.0.1:{free_port()}"
    providers = [f"p{i}" for i in range(12)] + ["p0", "p0"]
    opened = []  # the metadata each stream's Processor stream was opened with, weakly
    open_stream = Processor.open_stream
    monkeypatch.setattr(
        Processor, "open_stream", lambda self, metadata: opened.append(weakref.ref(metadata)) or open_stream(self, metadata)
    )

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            for provider in providers:
                call = _stream(ch, metadata=(("x-llm-provider", provider),))
                await call.write(REQ)
                await call.read()
                call.cancel()
                await _wait(lambda: r.processor.counters.active == 0)
            assert [c.provider for c in r.recorder.calls] == providers
            assert len(opened) == len(providers)
            gc.collect()
            alive = [m for m in (ref() for ref in opened) if m is not None]
            blocks = [b for p in r.server._protocols for b in h2compat.h2_connection(p).decoder.blocks.values()]
            assert len(blocks) <= h2compat.BLOCKS_KEPT * len(r.server._protocols)
            assert all(any(m is b.derived for b in blocks) for m in alive)  # only on a kept block
            for m in alive:
                with pytest.raises(TypeError):
                    m["x-llm-provider"] = "other"  # shared by the block's streams: read-only

    asyncio.run(main())


def test_streams_without_a_task_are_reported_when_their_connection_is_lost():
    address = f"127.0.0.1:{free_port()}"

    from h2.config import H2Configuration
    from h2.connection import H2Connection

    async def main() -> None:
        async with Running(address) as r:
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            c = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
            c.initiate_connection()
            for sid in (1, 3):
                c.send_headers(
                    sid,
                    [
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", METHOD),
                        (":authority", "x"),
                        ("content-type", "application/grpc"),
                        ("te", "trailers"),
                    ],
                )
                data = REQ.SerializeToString()
                c.send_data(sid, b"\0" + len(data).to_bytes(4, "big") + data)
            writer.write(c.data_to_send())
            await _wait(lambda: len(r.recorder.calls) == 0 and r.processor.counters.active == 2)
            assert len(r.server.exchanges) == 2
            writer.transport.abort()  # the connection drops with both streams open, no RST_STREAM
            await _wait(lambda: r.processor.counters.active == 0)
            assert not r.server.exchanges and r.server.cap.open == 0
            assert [c.outcome for c in r.recorder.calls] == [NO_RESPONSE, NO_RESPONSE]

    asyncio.run(main())


def test_health_check_watch_and_drain(address):
    async def main() -> None:
        async with Running(address, {"shutdownGraceSeconds": 5}) as r, _channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            unknown.cancel()

            # A stream in flight when the drain starts finishes normally; a new one is refused.
            call = await _in_flight(ch)
            assert len(r.server.exchanges) == 1  # handled without a task: the drain waits for it all the same
            drain = asyncio.create_task(server_mod.drain(r.server, r.health, r.processor, 5))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            await asyncio.sleep(0.2)
            assert not drain.done()
            late = _stream(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await late.write(REQ)
                await late.read()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            await call.write(RESP)
            assert (await call.read()).HasField("response_headers")
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            await asyncio.wait_for(drain, 5)  # well before the 5 s grace: it left once the stream ended
            assert [c.outcome for c in r.recorder.calls] == [OK] and r.processor.counters.active == 0

    asyncio.run(main())


def test_grace_expiry_cancels_and_reports():
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            call = await _in_flight(ch)
            await server_mod.drain(r.server, r.health, r.processor, 0.3)
            assert r.processor.counters.active == 0
            assert [c.outcome for c in r.recorder.calls] == [NO_RESPONSE]
            assert await call.code() != grpc.StatusCode.OK

    asyncio.run(main())


def test_removed_server_key_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse({"server": "grpcio"}, "c.yaml")
    assert str(e.value).startswith("c.yaml: server: removed")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"server": "grpclib"}))
    p = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "server: removed" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([sys.executable, "-m", "extproc", "serve", "--server", "grpclib"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--server" in p.stderr


def test_grpclib_connection_memory_is_bounded_by_closed_streams_kept():
    """h2 keeps a record per closed stream; on one long-lived Envoy connection that must not grow
    with every call (65,536 records, ~7.5 MB per connection, by h2's default)."""
    address = f"127.0.0.1:{free_port()}"
    n = CLOSED_STREAMS_KEPT + 200

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            for _ in range(n):  # one channel: one HTTP/2 connection, as Envoy's pool
                call = await _in_flight(ch)
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
            await _wait(lambda: len(r.recorder.calls) == n)
            [proto] = r.server._protocols
            h2_conn = h2compat.h2_connection(proto)
            assert h2_conn.highest_inbound_stream_id >= 2 * n - 1  # all of them on this connection
            assert len(h2_conn._closed_streams) == CLOSED_STREAMS_KEPT

    asyncio.run(main())


def _raw_stream(channel: grpc.aio.Channel):
    """A stream whose requests are sent as given bytes (a hostile client, not Envoy)."""
    call = channel.stream_stream(METHOD, request_serializer=lambda b: b, response_deserializer=pb.ProcessingResponse.FromString)
    return call()


def test_malformed_streams_log_one_line_each_rate_limited_without_tracebacks(caplog, monkeypatch):
    """A stream whose message is not a ProcessingRequest (grpclib alone would log a ~1.8 KB
    "Application error" traceback for each): the client gets INVALID_ARGUMENT, the call is still
    reported, and the log has one line (no traceback) however many such streams arrive."""
    from extproc.core.logs import RateLimited
    from extproc.server import grpc_server

    monkeypatch.setattr(grpc_server, "bad_stream_log", RateLimited(grpc_server.log, interval=60))
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            for _ in range(20):
                call = _raw_stream(ch)
                await call.write(REQ.SerializeToString())
                await call.read()
                await call.write(b"\xff\xff\xff\xff")  # not a protobuf message
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call.read()
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await _wait(lambda: len(r.recorder.calls) == 20)
            assert r.processor.counters.bad_streams == 20 and r.processor.counters.active == 0 and r.processor.counters.internal_errors == 0

    with caplog.at_level("INFO"):
        asyncio.run(main())
    errors = [rec for rec in caplog.records if rec.levelno >= 30]
    assert [rec.getMessage() for rec in errors] == ["malformed ext_proc stream"]
    assert all(rec.exc_info is None for rec in caplog.records)


def test_oversized_grpc_message_is_refused_before_it_is_read():
    """grpclib alone accepts a message of any size (one of 300 MB grew a worker to 940 MB). Past limits.maxGrpcMessageBytes the stream ends with RESOURCE_EXHAUSTED from the
    message's 5-byte prefix, and the server has not buffered the body."""
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address, {"limits": {"maxGrpcMessageBytes": 1 << 20}}) as r, _channel(address) as ch:
            ok = _raw_stream(ch)
            await ok.write(body_msg(1 << 19))  # under the limit: processed
            assert (await ok.read()).HasField("response_body")
            big = _raw_stream(ch)
            await big.write(body_msg(32 << 20))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await big.read()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            [proto] = r.server._protocols
            assert proto.connection.data_received < 16 << 20  # flow control stopped the rest
            await ok.done_writing()
            await _wait(lambda: len(r.recorder.calls) == 2)

    asyncio.run(main())


def body_msg(n: int) -> bytes:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x" * n)).SerializeToString()


class _Refusals:
    """An observer that records the streams the server refused, by reason."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def on_stream_refused(self, reason: str) -> None:
        self.reasons.append(reason)

    def on_call_end(self, call: object) -> None:
        pass


def test_streams_past_max_streams_are_refused_unread_and_counted():
    """limits.maxStreams: the next ext_proc stream is refused as it opens (Envoy then lets the
    call through unobserved); health streams are not counted; a slot frees when a stream ends."""
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address, {"limits": {"maxStreams": 2}}) as r, _channel(address) as ch:
            refusals = _Refusals()
            r.processor.apply(r.processor.settings, [r.recorder, refusals])
            first, second = await _in_flight(ch), await _in_flight(ch)
            assert r.server.cap is not None and r.server.cap.open == 2
            third = _stream(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await third.write(REQ)
                await third.read()
            # REFUSED_STREAM: grpcio reports UNAVAILABLE, or INTERNAL when its write races the reset
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
            assert r.processor.counters.refused == {"max_streams": 1} and refusals.reasons == ["max_streams"]
            assert r.processor.counters.active == 2  # the refused stream never became a call
            stub = health_pb2_grpc.HealthStub(ch)  # not an ext_proc stream: not capped
            assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
            await first.write(RESP)
            await first.read()
            await first.done_writing()
            assert await first.code() == grpc.StatusCode.OK
            await _wait(lambda: r.server.cap.open == 1)
            again = await _in_flight(ch)  # a slot is free again
            for call in (second, again):
                call.cancel()
            await _wait(lambda: r.processor.counters.active == 0 and r.server.cap.open == 0)
            assert len(r.recorder.calls) == 3 and r.processor.counters.refused == {"max_streams": 1}

    asyncio.run(main())


def test_stream_cap_counts_streams_waiting_for_a_busy_worker():
    """limits.maxWaitingStreams: streams accepted whose handler has not run yet (the event loop is
    busy) are what piles up under overload; past the bound new ones are refused as "overloaded".
    A burst on a healthy worker is not refused: only once the oldest has waited WAIT_GRACE.
    A task cancelled before it ran (its connection closed) is released too."""

    async def main() -> None:
        cap = StreamCap(METHOD, lambda: 10, lambda: 2, lambda reason: None)

        async def handler() -> None:
            cap.started(asyncio.current_task())
            await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(handler()) for _ in range(2)]
        for t in tasks:
            cap.opened(t)
        assert cap.full() is None  # a burst accepted in one loop pass: none has waited long yet
        cap._clock = lambda: time.monotonic() + StreamCap.WAIT_GRACE  # the busy loop took that long
        assert cap.full() == "overloaded" and cap.open == 2
        await asyncio.sleep(0)  # they start
        assert cap.full() is None and not cap.waiting and cap.open == 2
        never_ran = asyncio.create_task(handler())
        cap.opened(never_ran)
        never_ran.cancel()
        await asyncio.gather(*tasks, never_ran, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks
        assert cap.open == 0 and not cap.waiting
        cap.max_open = lambda: 0
        assert cap.full() == "max_streams"

    asyncio.run(main())


def test_stream_cap_knows_when_the_event_loop_runs_behind():
    """Streams handled without a task never wait, so the worker's lateness is measured instead:
    a beat BEAT s after a new stream; a loop blocked past LATE reads as behind, and the beats go
    on while it does, until one runs on time; that one schedules no next beat (the next new
    stream does), and with no stream open the beats stop."""

    async def main() -> None:
        # The loop's clock is the test's: a beat runs exactly as late as the test makes it,
        # however late a loaded machine runs the test itself (a real beat 20 ms late is LATE).
        loop = asyncio.get_running_loop()
        now = [loop.time()]
        loop.time = lambda: now[0]  # type: ignore[method-assign]

        async def beat_at(late: float) -> None:
            """Moves the clock to the next beat's time plus ``late`` and lets the loop run it."""
            due = cap._due
            assert due is not None
            now[0] = due + late
            for _ in range(1000):
                if cap._due != due:
                    return
                await asyncio.sleep(0)
            raise AssertionError("the beat did not run")

        cap = StreamCap(METHOD, lambda: 10, lambda: 2, lambda reason: None)
        cap.taken()
        assert cap.behind() is False  # and a beat is armed
        await beat_at(2 * StreamCap.LATE)  # the worker was busy: the beat ran late
        assert cap.behind() is True and cap._due is not None  # and the beats go on
        await beat_at(2 * StreamCap.LATE)
        assert cap.behind() is True and cap._due is not None
        await beat_at(StreamCap.LATE / 2)  # on time again (less than LATE behind)
        assert cap._due is None  # a stream is open, but the loop keeps up: no next beat
        assert cap.behind() is False and cap._due is not None  # a new stream arms one
        await beat_at(2 * StreamCap.LATE)
        assert cap.behind() is True
        cap.released()
        await beat_at(2 * StreamCap.LATE)
        assert cap._due is None and cap.late is False  # no stream open: no more beats
        del loop.time  # type: ignore[method-assign]

    asyncio.run(main())


def test_a_worker_that_keeps_up_is_woken_by_no_beat_between_new_streams():
    """A beat is a timer: one that fires while the loop sleeps is a wake-up of its own. With a
    stream open and the loop idle, one beat follows the new stream, and no more: not one every
    BEAT s for as long as the stream stays open."""

    async def main() -> None:
        cap = StreamCap(METHOD, lambda: 10, lambda: 2, lambda reason: None)
        beats = []
        real = cap._beat
        cap._beat = lambda loop: (beats.append(loop.time()), real(loop))  # type: ignore[method-assign]
        cap.taken()
        cap.behind()
        await asyncio.sleep(12 * StreamCap.BEAT)  # the stream stays open, nothing else happens
        assert len(beats) == 1 and cap._due is None
        cap.taken()  # a second stream
        cap.behind()
        await asyncio.sleep(4 * StreamCap.BEAT)
        assert len(beats) == 2 and cap.open == 2

    asyncio.run(main())


def test_a_worker_whose_loop_is_blocked_gives_the_next_stream_a_task_and_keeps_measuring():
    """The whole path, no part replaced: a stream arms a beat, the event loop is then blocked
    past the beat's time (a worker busier than it can keep up with), so the beat runs late; the
    next stream gets a task (so limits.maxWaitingStreams can count and refuse streams), and
    once the loop is free again a beat runs on time and the beats stop."""
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            cap = r.server.cap
            first = await _in_flight(ch)
            assert len(r.server.exchanges) == 1 and cap._due is not None  # no task; a beat armed
            time.sleep(StreamCap.BEAT + 3 * StreamCap.LATE)  # the worker is busy: the beat is due meanwhile
            await _wait(lambda: cap.late, timeout=1)
            opened = []
            real = cap.opened
            cap.opened = lambda task: (opened.append(task), real(task))  # type: ignore[method-assign]
            second = await _in_flight(ch)
            assert len(opened) == 1  # the new stream got a task
            await _wait(lambda: cap._due is None and not cap.late)  # a beat on time: none after it
            assert cap.open == 2
            for call in (first, second):
                call.cancel()

    asyncio.run(main())


def test_a_worker_behind_gives_new_streams_tasks_that_count_as_waiting():
    """While the worker runs behind, a new stream gets a task (counted as waiting until it runs,
    so limits.maxWaitingStreams can refuse the next ones) instead of being handled without one."""
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            cap = r.server.cap
            await _in_flight(ch)
            assert len(r.server.exchanges) == 1
            cap.behind = lambda: True
            opened = []
            real = cap.opened
            cap.opened = lambda task: (opened.append(task), real(task))
            call = await _in_flight(ch)
            [proto] = r.server._protocols
            assert len(opened) == 1 and len(proto.handler._tasks) == 1 and len(r.server.exchanges) == 1
            await call.write(RESP)
            assert (await call.read()).HasField("response_headers")
            assert cap.open == 2 and not cap.waiting

    asyncio.run(main())


def test_observability_mode_streams_get_no_replies_and_end_at_the_response_end():
    """Observability mode: Envoy expects no reply and would keep the stream open for its
    deferred_close_timeout (5 s) after the response; the server sends nothing and ends the stream
    (OK) at the response's end, without waiting for Envoy to half-close, and reports the call."""
    address = f"127.0.0.1:{free_port()}"
    from tests.unit.test_processor import CHAT_JSON, body, req_headers

    async def main() -> None:
        async with Running(address) as r, _channel(address) as ch:
            call = _stream(ch)
            msgs = [
                req_headers(),
                _headers("response_headers", **{":status": "200", "content-type": "application/json"}),
                body("response_body", CHAT_JSON[:20]),
                body("response_body", CHAT_JSON[20:], end=True),
            ]
            for m in msgs:
                m.observability_mode = True
                await call.write(m)
            assert await asyncio.wait_for(call.code(), 2) == grpc.StatusCode.OK  # ended by the server
            assert [reply async for reply in call] == []
            await _wait(lambda: len(r.recorder.calls) == 1)
            assert r.recorder.calls[0].obs.usage.total_tokens == 12

    asyncio.run(main())


def test_a_reads_replies_leave_at_its_end_without_a_callback_and_other_writes_at_the_next_iteration():
    """What handling a read writes (here the reply to a streamed chunk's message) is handed to
    the socket at the end of ``data_received``, with no event-loop callback scheduled for it;
    a write made outside a read (a task's, a timer's) is flushed by a callback at the next
    iteration, joined with any other made meanwhile."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    from tests.unit.test_h2compat import REQUEST_HEADERS, _grpc_frame

    async def main() -> None:
        server = build_server(Processor(parse({"listen": "127.0.0.1:1"}), []), "127.0.0.1:1")
        proto = server._protocol_factory()
        transport = RecordingTransport()
        proto.connection_made(transport)
        out = proto._out
        loop = asyncio.get_running_loop()
        scheduled: list = []

        class CountingLoop:
            def call_soon(self, callback, *args):
                scheduled.append(callback)
                return loop.call_soon(callback, *args)

        out._loop = CountingLoop()
        client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        client.initiate_connection()
        client.send_headers(1, REQUEST_HEADERS)
        client.send_data(1, _grpc_frame(REQ))
        proto.data_received(client.data_to_send())
        assert CONTINUE_REQUEST_HEADERS in transport.written  # the reply left with the read
        for _ in range(3):  # a streamed chunk's message, one read each
            before = len(transport.written)
            client.send_data(1, _grpc_frame(RESP))
            proto.data_received(client.data_to_send())
            assert len(transport.written) > before
        assert scheduled == [] and len(server.exchanges) == 1
        before = bytes(transport.written)
        out.write(b"one")
        out.write(b"two")
        assert len(scheduled) == 1 and transport.written == before
        await asyncio.sleep(0)
        assert transport.written == before + b"onetwo"

    asyncio.run(main())


def _chunked_stream(monkeypatch, observe: bool, pick: bool = True, context: bool = False) -> dict:
    """One streamed chat completion (request headers and body, response headers, 12 SSE
    chunks, the last body with end of stream), each message in its own read, through a server
    connection: how often the server tested a message for a streamed chunk's shape
    (``wire.response_body_only``; with the observability-mode flag, separately) and handled one
    from its bytes, what it wrote, and the call it reported. ``observe``: every message carries
    ``observability_mode``. ``pick`` False: a stream in observability mode keeps ``one`` (the
    default mode's chunk test per message, which fails on each: every message parsed).
    ``context``: every message carries Envoy's empty forwarded metadata context."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.settings import SettingCodes

    from extproc.server import grpc_server
    from extproc.server import processor as processor_mod
    from tests.unit.test_h2compat import REQUEST_HEADERS, _grpc_frame
    from tests.unit.test_processor import SSE, body, req_headers

    tested, tested_observed, chunks = [], [], []
    body_only, handle_chunk = grpc_server._body_only, processor_mod.Stream.handle_body_chunk

    def spy(data: bytes, context: bool = False, observed: bool = False) -> bytes | None:
        (tested_observed if observed else tested).append(1)
        return body_only(data, context, observed)

    monkeypatch.setattr(grpc_server, "_body_only", spy)
    monkeypatch.setattr(processor_mod.Stream, "handle_body_chunk", lambda s, b: chunks.append(1) or handle_chunk(s, b))
    if not pick:
        monkeypatch.setattr(grpc_server._Exchange, "one_observed", grpc_server._Exchange.one)
    events = [e + b"\n\n" for e in SSE.split(b"\n\n") if e]
    messages = [
        req_headers(),
        body("request_body", b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}', end=True),
        _headers("response_headers", **{":status": "200", "content-type": "text/event-stream"}),
        *[body("response_body", events[0]) for _ in range(10)],
        *[body("response_body", e) for e in events[1:-1]],
        body("response_body", events[-1], end=True),
    ]
    client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    client.send_headers(1, REQUEST_HEADERS)
    reads = [client.data_to_send()]
    for m in messages:
        m.observability_mode = observe
        if context:
            m.metadata_context.SetInParent()
        client.send_data(1, _grpc_frame(m))
        reads.append(client.data_to_send())
    recorder = Recorder()
    server = build_server(Processor(parse({"listen": "127.0.0.1:1"}), [recorder]), "127.0.0.1:1")
    transport = RecordingTransport()

    async def main() -> None:
        proto = server._protocol_factory()
        proto.connection_made(transport)
        for read in reads:
            proto.data_received(read)
        if not observe:
            proto.data_received(_rst_frame(1))  # Envoy's reset ends a default-mode stream
        await asyncio.sleep(0)
        assert not server.exchanges and not proto.handler._tasks  # closed, never handed to a task

    asyncio.run(main())
    [call] = recorder.calls
    return {
        "messages": len(messages),
        "tested": len(tested),
        "tested_observed": len(tested_observed),
        "chunks": len(chunks),
        "written": bytes(transport.written),
        "call": (call.outcome, call.obs.response_model, call.obs.usage.total_tokens, call.obs.finish_reasons),
    }


def _rst_frame(sid: int) -> bytes:
    return (4).to_bytes(3, "big") + bytes([3, 0]) + sid.to_bytes(4, "big") + (8).to_bytes(4, "big")


@pytest.mark.parametrize("context", [False, True])
def test_a_stream_in_observability_mode_reads_its_chunks_from_their_bytes(context):
    """The server tests each message for a streamed chunk's shape (``wire.response_body_only``)
    and handles the chunks from their bytes in the default mode; a stream in observability mode
    (whose messages all carry ``observability_mode``, Envoy's last field) is tested for the
    default shape at its first message only, then each message for the chunk's shape with the
    flag (``_Exchange.one_observed``), and its chunks handled from their bytes too, with or
    without Envoy's metadata context: what it writes (nothing but the stream's end) and the call
    it reports are those of every message parsed."""
    with pytest.MonkeyPatch.context() as patch:
        default = _chunked_stream(patch, observe=False, context=context)
    with pytest.MonkeyPatch.context() as patch:
        observed = _chunked_stream(patch, observe=True, context=context)
    with pytest.MonkeyPatch.context() as patch:
        parsed = _chunked_stream(patch, observe=True, pick=False, context=context)
    assert default["tested"] == default["messages"] == 16 and default["chunks"] == 12
    assert observed["tested"] == 1 and observed["tested_observed"] == 15 and observed["chunks"] == 12
    assert parsed["tested"] == parsed["messages"] and parsed["chunks"] == 0
    assert observed["written"] == parsed["written"] and observed["call"] == parsed["call"]
    assert observed["call"] == default["call"] == (OK, "m-1", 7, ["stop"])
