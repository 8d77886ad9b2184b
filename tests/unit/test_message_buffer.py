"""MessageBuffer: an ext_proc stream's DATA frames read as whole gRPC messages, with grpclib's
flow control (a frame is acknowledged when the reader needs its bytes, not on arrival)."""

from __future__ import annotations

import asyncio

import pytest
from grpclib.const import Status

from extproc.server.message_buffer import LARGE_MESSAGE, BadStream, MessageBuffer


def framed(*messages: bytes) -> bytes:
    return b"".join(b"\0" + len(m).to_bytes(4, "big") + m for m in messages)


def drain(buf: MessageBuffer) -> list[bytes]:
    out = []
    while (m := buf.next_message()) is not None:
        out.append(m)
    return out


MESSAGES = [b"a" * 10, b"", b"b" * 300, b"c"]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 6, 7, 50, 1000])
def test_messages_across_any_frame_boundaries(cut):
    acked = []
    buf = MessageBuffer(acked.append, lambda: 1 << 20)
    data = framed(*MESSAGES)
    frames = [data[i : i + cut] for i in range(0, len(data), cut)]
    for f in frames:
        buf.add(f, len(f) + 1)  # flow-controlled length (padding counts)
    assert acked == [] and buf.unacked_size() == len(data) + len(frames)  # nothing acknowledged on arrival
    assert drain(buf) == MESSAGES
    assert sum(acked) == len(data) + len(frames) and buf.unacked_size() == 0
    assert not buf.ended
    buf.eof()
    assert buf.next_message() is None and buf.ended


def test_only_the_frames_the_reader_needs_are_acknowledged():
    acked = []
    buf = MessageBuffer(acked.append, lambda: 1 << 20)
    one, two = framed(b"x" * 20), framed(b"y" * 20)
    buf.add(one, len(one))
    buf.add(two, len(two))
    assert buf.next_message() == b"x" * 20
    assert acked == [len(one)] and buf.unacked_size() == len(two)  # the second frame is still Envoy's to wait for


def test_frames_of_one_whole_message_mixed_with_split_ones():
    """Envoy's frames each hold one whole message (taken straight from the frame); a message
    split across frames, or frames holding several, between them keep their order and acks."""
    acked = []
    buf = MessageBuffer(acked.append, lambda: 1 << 20)
    a, b, c, d, e = framed(b"a" * 7), framed(b"b" * 9), framed(b"c"), framed(b""), framed(b"e" * 4)
    frames = [a, b[:3], b[3:] + c[:2], c[2:], d, d + e, a]
    for f in frames:
        buf.add(f, len(f))
    assert drain(buf) == [b"a" * 7, b"b" * 9, b"c", b"", b"", b"e" * 4, b"a" * 7]
    assert acked == [len(f) for f in frames] and buf.unacked_size() == 0
    assert buf.next_message() is None and not buf.ended


def test_an_oversized_message_in_one_frame_is_refused():
    buf = MessageBuffer(lambda n: None, lambda: 999)
    buf.add(framed(b"q" * 999), 1004)
    assert buf.next_message() == b"q" * 999
    buf.add(framed(b"q" * 1000), 1005)
    with pytest.raises(BadStream) as e:
        buf.next_message()
    assert e.value.status == Status.RESOURCE_EXHAUSTED


def test_a_waiting_reader_acknowledges_frames_as_they_arrive():
    """A message larger than the stream's window: its first frames must be acknowledged while the
    reader waits for the rest, or the peer could never send the rest."""

    async def main() -> None:
        acked = []
        buf = MessageBuffer(acked.append, lambda: 1 << 20)

        async def reader() -> bytes:
            while (m := buf.next_message()) is None:
                await buf.wait()
            return m

        task = asyncio.ensure_future(reader())
        data = framed(b"z" * 5000)
        for i in range(0, len(data), 1000):
            buf.add(data[i : i + 1000], 1000)
            for _ in range(3):
                await asyncio.sleep(0)
            assert sum(acked) == i + 1000  # given back to the peer while the message is incomplete
        assert await asyncio.wait_for(task, 1) == b"z" * 5000

    asyncio.run(main())


@pytest.mark.parametrize("inline", [False, True])
def test_wait_returns_at_the_end_of_the_stream(inline):
    """END_STREAM wakes a waiting reader, also one whose messages are handled inline (a message
    handled inline does not wake it)."""

    async def main() -> None:
        buf = MessageBuffer(lambda n: None, lambda: 1 << 20)
        if inline:
            buf.inline = lambda m: True
        assert buf.next_message() is None
        waiter = asyncio.ensure_future(buf.wait())
        await asyncio.sleep(0)
        if inline:
            buf.add(framed(b"x"), 6)
            await asyncio.sleep(0)
        assert not waiter.done()
        buf.eof()
        await asyncio.wait_for(waiter, 1)
        assert buf.next_message() is None and buf.ended

    asyncio.run(main())


def test_an_oversized_message_is_refused_from_its_prefix():
    acked = []
    buf = MessageBuffer(acked.append, lambda: 999)
    data = framed(b"q" * 1000)
    buf.add(data[:5], 5)
    buf.add(data[5:], 1000)
    with pytest.raises(BadStream) as e:
        buf.next_message()
    assert e.value.status == Status.RESOURCE_EXHAUSTED
    assert acked == [5] and buf.unacked_size() == 1000  # the body was never acknowledged


@pytest.mark.parametrize(
    "data, status, reason",
    [
        (b"\1\0\0\0\1x", Status.UNIMPLEMENTED, "compressed message"),
        (b"\0\0\0", Status.INVALID_ARGUMENT, "truncated message prefix"),
        (b"\0\0\0\0\x09abc", Status.INVALID_ARGUMENT, "truncated message"),
    ],
)
def test_bad_input_ends_the_stream_with_a_status(data, status, reason):
    buf = MessageBuffer(lambda n: None, lambda: 1 << 20)
    buf.add(data, len(data))
    buf.eof()
    with pytest.raises(BadStream) as e:
        buf.next_message()
    assert (e.value.status, e.value.reason) == (status, reason)


def test_large_messages_are_reported():
    sizes = []
    buf = MessageBuffer(lambda n: None, lambda: 1 << 20, sizes.append)
    data = framed(b"l" * LARGE_MESSAGE, b"s")
    buf.add(data, len(data))
    assert drain(buf) == [b"l" * LARGE_MESSAGE, b"s"] and sizes == [LARGE_MESSAGE]


def test_inline_handles_messages_while_the_reader_waits():
    """Messages arriving while the reader waits go to ``inline`` as their frames arrive, in order,
    without waking the reader; a False from it wakes the reader, and messages arriving before the
    reader waits again are the reader's (order kept); a bad message is raised to the reader."""

    async def main() -> None:
        seen: list[tuple[str, bytes]] = []
        wakes = 0
        buf = MessageBuffer(lambda n: None, lambda: 1 << 20)
        buf.inline = lambda m: seen.append(("inline", m)) or m != b"stop"

        async def reader() -> None:
            nonlocal wakes
            while True:
                m = buf.next_message()
                if m is not None:
                    seen.append(("reader", m))
                elif buf.ended:
                    return
                else:
                    await buf.wait()
                    wakes += 1

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)
        one, two = framed(b"1"), framed(b"2")
        buf.add(one[:3], 3)
        buf.add(one[3:] + two, 7)
        for _ in range(3):
            await asyncio.sleep(0)
        assert seen == [("inline", b"1"), ("inline", b"2")] and wakes == 0
        data = framed(b"stop", b"3")
        buf.add(data, len(data))  # "stop" hands over: "3" is the reader's
        buf.add(framed(b"4"), 6)  # still the reader's: it has not waited again yet
        for _ in range(3):
            await asyncio.sleep(0)
        assert seen[2:] == [("inline", b"stop"), ("reader", b"3"), ("reader", b"4")] and wakes == 1
        buf.add(framed(b"5"), 6)
        assert seen[-1] == ("inline", b"5")
        buf.add(b"\1\0\0\0\0", 5)  # compressed: raised in the reader's task
        with pytest.raises(BadStream) as e:
            await asyncio.wait_for(task, 1)
        assert e.value.status == Status.UNIMPLEMENTED

    asyncio.run(main())


def _exchange(frames: list[bytes], within: int, max_size: int = 1 << 20) -> list:
    """What a stream handled without a task sees for ``frames`` (each added with a flow-controlled
    length one more than its bytes): every message ``inline`` got, every acknowledgment, the
    hand-over, then what a reader task (``inline`` still set, as the server's) read and raised.
    ``inline`` returns False at b"stop" (the hand-over) and raises at b"boom"."""
    log: list = []

    async def main() -> None:
        buf = MessageBuffer(lambda n: log.append(("ack", n)), lambda: max_size, lambda n: log.append(("large", n)), within)

        def inline(m: bytes) -> bool:
            log.append(("inline", m))
            if m == b"boom":
                raise ValueError("boom")
            return m != b"stop"

        async def reader() -> None:
            try:
                buf.check()
                while True:
                    m = buf.next_message()
                    if m is not None:
                        log.append(("reader", m))
                    elif buf.ended:
                        return
                    else:
                        await buf.wait()
            except Exception as e:
                log.append(("raised", type(e).__name__))

        tasks: list = []
        buf.inline = inline
        buf.handover = lambda: (log.append(("handover",)), tasks.append(asyncio.ensure_future(reader())))
        for i, f in enumerate(frames):
            buf.add(f, len(f) + 1)
            if i % 3 == 2:
                await asyncio.sleep(0)
            log.append(("unacked", buf.unacked_size()))
        buf.eof()
        for t in tasks:
            await asyncio.wait_for(t, 1)
        log.append(("end", buf.ended, buf.unacked_size()))

    asyncio.run(main())
    return log


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("within", [0, 64, 1 << 16])
def test_a_frame_of_one_whole_message_is_handled_as_the_general_path_handles_it(seed, within, monkeypatch):
    """``add``'s shortcut for a frame holding one whole message (Envoy's) gives ``inline`` the
    same messages, acknowledgments, hand-overs and errors, in the same order, as the general
    path (``_add``: queued, then read by ``next_message``), whatever frames come before and
    after it: split messages, several per frame, empty ones, a large one, a compressed one, an
    oversized one, ``inline`` handing over or raising."""
    import random

    rnd = random.Random(seed)
    pool = [b"a" * 7, b"", b"x" * 120, b"stop", b"boom", b"l" * LARGE_MESSAGE, b"o" * 200]
    frames: list[bytes] = []
    for _ in range(rnd.randint(1, 12)):
        shape = rnd.random()
        m = rnd.choice(pool[:4] + pool[6:] if rnd.random() < 0.7 else pool)
        if shape < 0.6:
            frames.append(framed(m))
        elif shape < 0.75:
            data = framed(m, rnd.choice(pool[:3]))
            frames.append(data)
        elif shape < 0.9:
            data = framed(m)
            cut = rnd.randint(1, len(data))
            frames += [data[:cut], data[cut:]] if cut < len(data) else [data]
        else:
            frames.append(b"\1" + framed(m)[1:])  # compressed
    if seed < 2:  # a frame that would read as one whole message, arriving after a message's prefix
        frames += [framed(b"abc")[:5], framed(b"xyz")] if seed == 0 else [b"\0", framed(b"xyz")]
    max_size = max(150, within) if seed % 5 == 0 else 1 << 20  # (never below ``within``: the config's bound)
    fast = _exchange(frames, within, max_size)
    monkeypatch.setattr(MessageBuffer, "add", MessageBuffer._add)
    general = _exchange(frames, within, max_size)
    assert fast == general
