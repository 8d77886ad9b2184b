"""Incremental newline-delimited JSON (NDJSON, JSON Lines) splitter.

Returns each complete, non-blank line (stripped, still bytes: the parser filters lines cheaply
before paying for JSON). Work per chunk is proportional to the chunk: an unfinished line is kept
as pieces with its running length and joined once, when it ends. A line longer than
``max_line`` is dropped and counted in ``oversized`` instead of buffered without bound; the rest
of it, up to its newline, is skipped.
"""

from __future__ import annotations


class NDJSONDecoder:
    __slots__ = ("_pieces", "_held", "_dropping", "_max_line", "oversized")

    def __init__(self, max_line: int = 4 << 20) -> None:
        self._pieces: list[bytes] = []  # the unfinished line, as received
        self._held = 0  # its length (kept, not recomputed: linear in the bytes fed)
        self._dropping = False  # inside an oversized line: skip to its end
        self._max_line = max_line
        self.oversized = 0

    @property
    def held(self) -> int:
        return self._held

    def decode(self, chunk: bytes) -> list[bytes]:
        lines = chunk.split(b"\n")
        last = lines.pop()  # after the last newline: the start of an unfinished line (or b"")
        if lines and (self._pieces or self._dropping):  # the first line ends one begun earlier
            if self._dropping:  # the end of an oversized line
                self._dropping = False
                lines[0] = b""
            else:
                self._pieces.append(lines[0])
                lines[0] = b"".join(self._pieces)
                self._pieces = []
                self._held = 0
        if last and not self._dropping:
            self._held += len(last)
            if self._held > self._max_line:
                self._pieces = []
                self._held = 0
                self._dropping = True
                self.oversized += 1
            else:
                self._pieces.append(last)
        return list(filter(None, map(bytes.strip, lines)))  # in C: no Python frame per call

    def flush(self) -> list[bytes]:
        """End of body: an unterminated last line still counts."""
        line = b"".join(self._pieces).strip() if self._pieces else b""
        self._pieces = []
        self._held = 0
        return [line] if line else []
