"""Each private grpclib / h2 detail ``extproc.server.h2compat`` relies on, checked against the
installed versions: an upgrade that moves one fails here, by name."""
from __future__ import annotations

import asyncio

import grpc
from grpclib.server import Handler
from h2.connection import H2Connection

from extproc.core.call import NO_RESPONSE, OK
from extproc.core.config import parse
from extproc.devtools.dev import free_port
from extproc.server import h2compat
from extproc.server.grpc_server import build_server
from extproc.server.processor import Processor
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
                await _wait(lambda: processor.active == 2)
                second.cancel()
                await _wait(lambda: processor.active == 1)

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
