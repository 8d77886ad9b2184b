"""Incremental server-sent-events decoder.

Give it body chunks as they arrive (``decode``); it returns the complete events each chunk
finishes (the ``extproc.codecs.Framing`` interface). Work per
chunk is proportional to the chunk (an unfinished line is kept as pieces and joined once, when it
ends), events split across chunks are reassembled, and a line longer than ``max_line`` is dropped
and counted rather than buffered without bound. The same cap applies to a whole event: many
short ``data:`` lines adding up to more than ``max_line`` drop that event (counted too).
"""

from __future__ import annotations

Event = tuple[bytes, bytes]  # (event name, data); name is b"" when the event has no "event:" field


class SSEDecoder:
    __slots__ = ("_pieces", "_plen", "_dropping", "_skip_lf", "_event", "_data", "_dlen", "_drop_event", "_max_line", "oversized", "held")

    def __init__(self, max_line: int = 4 << 20) -> None:
        self._pieces: list[bytes] = []  # the unfinished last line, as received
        self._plen = 0
        self._dropping = False  # inside an oversized line: discard up to its end
        self._skip_lf = False  # the previous chunk ended in "\r": a leading "\n" is its pair
        self._event = b""
        self._data: list[bytes] = []
        self._dlen = 0  # bytes in _data
        self._drop_event = False  # the event being read went over max_line: skip to its end
        self._max_line = max_line
        self.oversized = 0  # lines dropped for exceeding max_line
        # Bytes held: the unfinished line and the data of the unfinished event (``_plen`` +
        # ``_dlen``, set after each ``decode`` and ``flush``: a plain attribute, read per chunk)
        self.held = 0

    def decode(self, chunk: bytes) -> list[Event]:
        if (
            chunk.endswith(b"\n\n")
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.find(b"\r") < 0
            and not (self._pieces or self._data or self._event or self._skip_lf or self._dropping or self._drop_event)
            and len(chunk) - 7 <= self._max_line
        ):
            # The common chunk, one whole event of one data line between events: what the loop
            # below makes of it (the value after "data: ", no state left, nothing held), without
            # the loop.
            return [(b"", chunk[6:-2])]
        out = self._decode(chunk)
        self.held = self._plen + self._dlen
        return out

    def _decode(self, chunk: bytes) -> list[Event]:
        out: list[Event] = []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if chunk.find(b"\r") >= 0:  # "\r\n" and a lone "\r" end lines too
            self._skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.rfind(b"\n")
        if end < 0:
            self._hold(chunk)
            return out
        head = chunk[:end]
        if self._dropping:
            self._dropping = False
            cut = head.find(b"\n")
            head = b"" if cut < 0 else head[cut + 1 :]
            if cut < 0:
                head = None  # type: ignore[assignment]
        elif self._pieces:
            self._pieces.append(head)
            head = b"".join(self._pieces)
            self._pieces = []
            self._plen = 0
        if end + 1 < len(chunk):
            self._hold(chunk[end + 1 :])
        if head is None:
            return out
        lines = head.split(b"\n")
        i, n = 0, len(lines)
        while i < n:
            if self._drop_event:  # skip the rest of an oversized event in C: to its blank line
                try:
                    i = lines.index(b"", i) + 1
                except ValueError:
                    return out
                self._drop_event = False
                self._event = b""
                continue
            line = lines[i]
            i += 1
            if line:
                self._field(line)
            elif self._data or self._event:
                out.append(self._dispatch())
        return out

    def flush(self) -> list[Event]:
        """End of body: an unterminated last line and event still count."""
        if self._pieces and not self._dropping:
            self._field(b"".join(self._pieces))
        self._pieces = []
        self._plen = 0
        self._dropping = False
        out = []
        if self._drop_event:
            self._drop_event = False
        elif self._data or self._event:
            out.append(self._dispatch())
        self.held = self._dlen
        return out

    def _hold(self, piece: bytes) -> None:
        if self._dropping or not piece:
            return
        self._plen += len(piece)
        if self._plen > self._max_line:
            self.oversized += 1
            self._pieces = []
            self._plen = 0
            self._dropping = True
            return
        self._pieces.append(piece)

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            if self._drop_event:
                return
            self._dlen += len(value) + 1
            if self._dlen > self._max_line:
                self.oversized += 1
                self._drop_event = True
                self._data = []
                self._dlen = 0
                return
            self._data.append(value)
        elif name == b"event":
            self._event = value

    def _dispatch(self) -> Event:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        event = (self._event, data)
        self._event = b""
        self._data = []
        self._dlen = 0
        return event
