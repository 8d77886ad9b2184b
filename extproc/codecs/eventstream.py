"""Incremental decoder for AWS ``application/vnd.amazon.eventstream`` (Bedrock streaming).

A message is::

    total length (u32) | headers length (u32) | prelude CRC32 (u32)
    headers | payload | message CRC32 (u32, over everything before it)

Each header is ``name length (u8) | name | type (u8) | value``; value sizes by type:
0/1 bool (0 bytes), 2 byte (1), 3 short (2), 4 int (4), 5 long (8), 6 bytes and 7 string
(u16 length + data), 8 timestamp (8), 9 uuid (16). Only string values are kept.

``EventStreamDecoder`` has the ``extproc.codecs.Framing`` interface. Frames may be split across
chunks at any byte. A frame whose message CRC (or header block) is
bad is skipped and counted in ``bad_frames``; later frames still decode. A bad prelude CRC or an
absurd declared length means the length cannot be trusted, so decoding stops (``failed``).
Nothing raises.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAX_FRAME = 16 << 20  # a frame declaring more than this is refused (memory bound)
_PRELUDE = 12
_MIN_FRAME = _PRELUDE + 4
_U32X3 = struct.Struct(">III")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
# fixed value sizes by header type; None: u16-length-prefixed
_FIXED: dict[int, int | None] = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 6: None, 7: None, 8: 8, 9: 16}


@dataclass(frozen=True, slots=True)
class Message:
    headers: dict[str, str]
    payload: bytes


class EventStreamDecoder:
    __slots__ = ("_buf", "_max_frame", "bad_frames", "failed")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self.bad_frames = 0
        self.failed: str | None = None  # "prelude_crc" or "frame_too_large": stream abandoned

    def decode(self, chunk: bytes) -> list[Message]:
        if self.failed is not None:
            return []
        buf = self._buf
        buf += chunk
        out: list[Message] = []
        pos = 0
        avail = len(buf)
        while avail - pos >= _PRELUDE:
            total, hlen, crc = _U32X3.unpack_from(buf, pos)
            if zlib.crc32(buf[pos : pos + 8]) != crc:
                self._fail("prelude_crc")
                return out
            if total > self._max_frame or total < _MIN_FRAME or hlen > total - _MIN_FRAME:
                self._fail("frame_too_large" if total > self._max_frame else "bad_prelude")
                return out
            if avail - pos < total:
                break
            with memoryview(buf) as view:
                message = self._message(view[pos : pos + total], hlen)
            if message is not None:
                out.append(message)
            pos += total
        if pos:
            del buf[:pos]
        return out

    def flush(self) -> list[Message]:
        """End of body: an unfinished frame is no message (``held`` > 0 then: a truncated stream)."""
        return []

    @property
    def held(self) -> int:
        """Bytes held of an unfinished frame (non-zero at end of body: truncated stream)."""
        return len(self._buf)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self._buf = bytearray()

    def _message(self, frame: memoryview, hlen: int) -> Message | None:
        end = len(frame) - 4
        if zlib.crc32(frame[:end]) != _U32.unpack_from(frame, end)[0]:
            self.bad_frames += 1
            return None
        headers = _headers(frame[_PRELUDE : _PRELUDE + hlen])
        if headers is None:
            self.bad_frames += 1
            return None
        return Message(headers, bytes(frame[_PRELUDE + hlen : end]))


def _headers(block: memoryview) -> dict[str, str] | None:
    out: dict[str, str] = {}
    i, n = 0, len(block)
    while i < n:
        nlen = block[i]
        j = i + 1 + nlen
        if j >= n:
            return None
        name = bytes(block[i + 1 : j])
        kind = block[j]
        j += 1
        size = _FIXED.get(kind, -1)
        if size == -1:
            return None
        if size is None:
            if j + 2 > n:
                return None
            vlen = _U16.unpack_from(block, j)[0]
            j += 2
            if j + vlen > n:
                return None
            if kind == 7:
                try:
                    out[name.decode()] = bytes(block[j : j + vlen]).decode()
                except UnicodeDecodeError:
                    return None
            j += vlen
        else:
            j += size
            if j > n:
                return None
        i = j
    return out
