"""The receive buffer of an ext_proc stream: the bytes of its DATA frames, read as whole gRPC
messages, at most one wake-up of the stream's task per message.

grpclib's own per-stream buffer hands out bytes through an ``asyncio.Queue`` (a queue item and a
wake-up per frame, two awaited reads per message: the 5-byte prefix, then the body); Envoy sends
each ext_proc message as one DATA frame, so most of that machinery runs per streamed chunk for
nothing. This buffer keeps the same contract with grpclib (``add`` per frame with its
flow-controlled length, ``eof`` at END_STREAM, ``unacked_size`` when the stream is released) and
the same flow control: a frame is acknowledged (its bytes given back to Envoy's windows) when the
reader needs its bytes, never on arrival, so what Envoy can queue here stays bounded by the
stream's window whatever the reader does; and a message larger than the window still arrives,
its frames acknowledged as they come while the reader waits for the rest.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable

from grpclib.const import Status

LARGE_MESSAGE = 256 << 10  # a message this large is reported to ``on_large`` (worth a malloc_trim)
_SIZE = struct.Struct(">L").unpack_from  # a gRPC message's length, after its compressed flag


class BadStream(Exception):
    """What a client sent on a stream is not a valid ext_proc message sequence (input, not a bug)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class MessageBuffer:
    """The reader's side: ``next_message()`` and ``wait()``; grpclib's side: ``add``, ``eof``,
    ``unacked_size`` (installed with :func:`extproc.server.h2compat.use_buffer`).

    ``inline``: while the reader waits, each message that arrives whole is handed to
    ``inline(message)`` right where its frame is received (no wake-up of the reader's task: a
    streamed chunk costs one event-loop iteration, not three); when it returns False the reader
    is woken to take over, and an exception it (or a bad message) raises is raised to the reader
    by ``wait()`` (or ``check()``).

    ``handover``: set while there is no reader at all (a stream handled without a task): every
    message is handed to ``inline`` as it arrives, and what would wake a reader (``inline``
    returned False or raised, a bad message, the end of the stream) calls ``handover()`` instead,
    once (it is cleared first): the caller then starts a reader."""

    __slots__ = (
        "_ack",
        "_max_size",
        "_within",
        "_on_large",
        "_frames",
        "_head",
        "_eof",
        "_need",
        "_size",
        "_waiter",
        "_unacked",
        "_error",
        "inline",
        "handover",
    )

    def __init__(
        self, ack: Callable[[int], None], max_size: Callable[[], int], on_large: Callable[[int], None] | None = None, within: int = 0
    ) -> None:
        self._ack = ack  # gives ``n`` flow-controlled bytes back to the peer's windows
        self._max_size = max_size  # read per message: a reload applies at once
        # a message shorter than this is within ``max_size()`` whatever it returns (and not large)
        self._within = min(within, LARGE_MESSAGE)
        self._on_large = on_large
        self._frames: deque[tuple[bytes, int]] = deque()  # frames not acknowledged yet
        self._head = bytearray()  # acknowledged bytes not taken yet
        self._eof = False
        self._need = 5  # bytes of ``_head`` the reader needs next
        self._size = -1  # the size of the message being read, once its prefix was taken
        self._waiter: asyncio.Future[None] | None = None
        self._unacked = 0
        self._error: Exception | None = None
        self.inline: Callable[[bytes], bool] | None = None
        self.handover: Callable[[], None] | None = None

    # ---- grpclib's side ------------------------------------------------------------------------
    def add(self, data: bytes, ack_size: int) -> None:
        """One DATA frame's payload and its flow-controlled length.

        The common frame, Envoy's, holds one whole message and arrives at an empty buffer whose
        messages go to ``inline``: it is handed over here as ``_add`` -> ``_run_inline`` ->
        ``next_message`` would (acknowledged, then ``inline(message)``, the same hand-over on
        False or an exception), without the frame queued and taken back, or the second
        ``next_message`` that finds the buffer empty."""
        waiter = self._waiter
        inline = self.inline
        if (
            inline is not None
            and (self.handover is not None if waiter is None else not waiter.done())
            and not self._frames
            and self._size < 0
            and not self._head
            and len(data) >= 5
            and not data[0]
        ):
            size = _SIZE(data, 1)[0]
            if len(data) == size + 5 and (size < self._within or size < LARGE_MESSAGE and size <= self._max_size()):
                if ack_size:
                    self._ack(ack_size)
                try:
                    if inline(data[5:]):
                        return  # (the buffer is empty, as ``next_message`` would find it: ``_need`` is 5)
                except Exception as e:  # raised to the reader, in its task
                    self._error = e
                self._wake()
                return
        self._add(data, ack_size)

    def _add(self, data: bytes, ack_size: int) -> None:
        """``add`` for any frame: queued, then read as ``inline`` or the reader needs."""
        self._frames.append((data, ack_size))
        self._unacked += ack_size
        waiter = self._waiter
        if waiter is None:
            if self.handover is not None and self.inline is not None:  # no reader: handled here
                self._run_inline(self.inline)
        elif not waiter.done():
            if self.inline is not None:
                self._run_inline(self.inline)
            elif self._fill(self._need):
                waiter.set_result(None)

    def eof(self) -> None:
        self._eof = True
        self._wake()

    def unacked_size(self) -> int:
        return self._unacked

    # ---- the reader's side ---------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        """END_STREAM arrived and every message was taken."""
        return self._eof and not self._frames and not self._head

    def next_message(self) -> bytes | None:
        """The next whole message's bytes; None if they have not all arrived (``wait()`` for
        them) or, once ``ended``, at the end of the stream. A message larger than ``max_size()`` is
        refused from its 5-byte prefix, before any more of it is acknowledged or buffered;
        compressed or truncated messages are refused too (:class:`BadStream`)."""
        size = self._size
        if size < 0 and not self._head:
            # The common case, Envoy's: each message is one DATA frame. Taken from the frame
            # itself (one copy), without passing through ``_head``.
            frames = self._frames
            if not frames:
                self._need = 5
                return None
            data, ack_size = frames[0]
            if len(data) >= 5 and not data[0]:
                size = _SIZE(data, 1)[0]
                if len(data) == size + 5 and size < LARGE_MESSAGE and size <= self._max_size():
                    frames.popleft()
                    if ack_size:
                        self._unacked -= ack_size
                        self._ack(ack_size)
                    return data[5:]
            size = -1
        if size < 0:
            if not self._fill(5):
                if self._eof and self._head:
                    raise BadStream(Status.INVALID_ARGUMENT, "truncated message prefix")
                self._need = 5
                return None
            prefix = self._take(5)
            if prefix[0]:
                raise BadStream(Status.UNIMPLEMENTED, "compressed message")
            size = int.from_bytes(prefix[1:5], "big")
            if size > self._max_size():
                raise BadStream(Status.RESOURCE_EXHAUSTED, "message larger than limits.maxGrpcMessageBytes")
            if size >= LARGE_MESSAGE and self._on_large is not None:
                self._on_large(size)
            self._size = size
        if not self._fill(size):
            if self._eof:
                raise BadStream(Status.INVALID_ARGUMENT, "truncated message")
            self._need = size
            return None
        self._size = -1
        return self._take(size)

    async def wait(self) -> None:
        """Until what ``next_message`` lacked has arrived, the stream ended, or ``inline`` handed
        over; raises what ``inline`` or a bad message raised meanwhile."""
        if not self._fill(self._need) and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.check()

    def check(self) -> None:
        """Raise what ``inline`` or a bad message raised while no reader was waiting."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # ---- internals -----------------------------------------------------------------------------
    def _fill(self, n: int) -> bool:
        """Whether ``n`` bytes can be taken now; acknowledges the frames it moves into ``_head``
        (the reader is about to use their bytes)."""
        head = self._head
        frames = self._frames
        while len(head) < n and frames:
            data, ack_size = frames.popleft()
            head += data
            if ack_size:
                self._unacked -= ack_size
                self._ack(ack_size)
        return len(head) >= n

    def _take(self, n: int) -> bytes:
        head = self._head
        out = bytes(head[:n])
        del head[:n]
        return out

    def _run_inline(self, inline: Callable[[bytes], bool]) -> None:
        try:
            while (message := self.next_message()) is not None:
                if not inline(message):
                    break
            else:
                return  # every whole message handled; the reader waits on
        except Exception as e:  # raised to the reader, in its task
            self._error = e
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self.handover is not None:
            handover, self.handover = self.handover, None
            handover()
