"""MessageBuffer: an ext_proc stream's DATA frames read as whole gRPC messages, with grpclib's
flow control (a frame is acknowledged when the reader needs its bytes, not on arrival)."""
from __future__ import annotations

import asyncio

import pytest
from grpclib.const import Status

from extproc.server.message_buffer import LARGE_MESSAGE, BadStream, MessageBuffer


def framed(*messages: bytes) -> bytes:
    return b"".join(b"\0" + len(m).to_bytes(4, "big") + m for m in messages)


def drain(buf: MessageBuffer, max_size: int = 1 << 20) -> list[bytes]:
    out = []
    while (m := buf.next_message(max_size)) is not None:
        out.append(m)
    return out


MESSAGES = [b"a" * 10, b"", b"b" * 300, b"c"]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 6, 7, 50, 1000])
def test_messages_across_any_frame_boundaries(cut):
    acked = []
    buf = MessageBuffer(acked.append)
    data = framed(*MESSAGES)
    frames = [data[i:i + cut] for i in range(0, len(data), cut)]
    for f in frames:
        buf.add(f, len(f) + 1)  # flow-controlled length (padding counts)
    assert acked == [] and buf.unacked_size() == len(data) + len(frames)  # nothing acknowledged on arrival
    assert drain(buf) == MESSAGES
    assert sum(acked) == len(data) + len(frames) and buf.unacked_size() == 0
    assert not buf.ended
    buf.eof()
    assert buf.next_message(1 << 20) is None and buf.ended


def test_only_the_frames_the_reader_needs_are_acknowledged():
    acked = []
    buf = MessageBuffer(acked.append)
    one, two = framed(b"x" * 20), framed(b"y" * 20)
    buf.add(one, len(one))
    buf.add(two, len(two))
    assert buf.next_message(100) == b"x" * 20
    assert acked == [len(one)] and buf.unacked_size() == len(two)  # the second frame is still Envoy's to wait for


def test_a_waiting_reader_acknowledges_frames_as_they_arrive():
    """A message larger than the stream's window: its first frames must be acknowledged while the
    reader waits for the rest, or the peer could never send the rest."""
    async def main() -> None:
        acked = []
        buf = MessageBuffer(acked.append)

        async def reader() -> bytes:
            while (m := buf.next_message(1 << 20)) is None:
                await buf.wait()
            return m

        task = asyncio.ensure_future(reader())
        data = framed(b"z" * 5000)
        for i in range(0, len(data), 1000):
            buf.add(data[i:i + 1000], 1000)
            for _ in range(3):
                await asyncio.sleep(0)
            assert sum(acked) == i + 1000  # given back to the peer while the message is incomplete
        assert await asyncio.wait_for(task, 1) == b"z" * 5000

    asyncio.run(main())


def test_wait_returns_at_the_end_of_the_stream():
    async def main() -> None:
        buf = MessageBuffer(lambda n: None)
        assert buf.next_message(10) is None
        waiter = asyncio.ensure_future(buf.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        buf.eof()
        await asyncio.wait_for(waiter, 1)
        assert buf.next_message(10) is None and buf.ended

    asyncio.run(main())


def test_an_oversized_message_is_refused_from_its_prefix():
    acked = []
    buf = MessageBuffer(acked.append)
    data = framed(b"q" * 1000)
    buf.add(data[:5], 5)
    buf.add(data[5:], 1000)
    with pytest.raises(BadStream) as e:
        buf.next_message(999)
    assert e.value.status == Status.RESOURCE_EXHAUSTED
    assert acked == [5] and buf.unacked_size() == 1000  # the body was never acknowledged


@pytest.mark.parametrize("data, status, reason", [
    (b"\1\0\0\0\1x", Status.UNIMPLEMENTED, "compressed message"),
    (b"\0\0\0", Status.INVALID_ARGUMENT, "truncated message prefix"),
    (b"\0\0\0\0\x09abc", Status.INVALID_ARGUMENT, "truncated message"),
])
def test_bad_input_ends_the_stream_with_a_status(data, status, reason):
    buf = MessageBuffer(lambda n: None)
    buf.add(data, len(data))
    buf.eof()
    with pytest.raises(BadStream) as e:
        buf.next_message(1 << 20)
    assert (e.value.status, e.value.reason) == (status, reason)


def test_large_messages_are_reported():
    sizes = []
    buf = MessageBuffer(lambda n: None, sizes.append)
    data = framed(b"l" * LARGE_MESSAGE, b"s")
    buf.add(data, len(data))
    assert drain(buf) == [b"l" * LARGE_MESSAGE, b"s"] and sizes == [LARGE_MESSAGE]
