"""Incremental splitter of a streamed top-level JSON array (Gemini's and Vertex AI's default
``streamGenerateContent`` framing): ``[{...},\r\n{...}]`` -> each element, parsed.
"""

from __future__ import annotations

import re
from typing import Any

import orjson


class JsonArrayDecoder:
    """Splits a streamed top-level JSON array (``[{...},{...}]``) into its elements incrementally.

    Scans with ``re`` searches for the few structural bytes (quotes, backslashes, braces,
    brackets) instead of a Python loop per byte. State (depth, inside-string, pending escape)
    carries across chunks, so any chunk boundary gives the same elements. An element larger than
    ``max_element`` is skipped to its end (counted in ``oversized``); one that is not valid JSON
    is counted in ``invalid``.
    """

    __slots__ = (
        "_pieces",
        "_held",
        "_depth",
        "_in_str",
        "_esc",
        "_started",
        "_skipping",
        "complete",
        "_max",
        "oversized",
        "invalid",
    )

    def __init__(self, max_element: int) -> None:
        self._pieces: list[bytes] = []  # the unfinished element, as received
        self._held = 0
        self._depth = 0
        self._in_str = False
        self._esc = False  # the previous chunk ended inside a string on a backslash
        self._started = False
        self._skipping = False  # inside an oversized element: scan on, hold nothing
        self.complete = False
        self._max = max_element
        self.oversized = 0
        self.invalid = 0

    @property
    def held(self) -> int:
        """Bytes of the unfinished element held."""
        return self._held

    def flush(self) -> list[Any]:
        """End of body: an unfinished element is not JSON; nothing more comes out (``complete``
        tells whether the array was closed)."""
        return []

    def decode(self, chunk: bytes) -> list[Any]:
        out: list[Any] = []
        n = len(chunk)
        pos = 0
        if self._esc and n:
            self._esc = False
            pos = 1
        elem = 0  # where the current element starts in this chunk
        while pos < n and not self.complete:
            if not self._started:
                i = chunk.find(b"[", pos)
                if i < 0:
                    return out
                self._started = True
                pos = i + 1
            elif self._depth == 0:
                m = _TOP.search(chunk, pos)
                if m is None:
                    return out
                pos = m.end()
                if chunk[m.start()] == 0x5D:  # ]
                    self.complete = True
                else:
                    self._depth = 1
                    elem = m.start()
            elif self._in_str:
                m = _IN_STR.search(chunk, pos)
                if m is None:
                    pos = n
                elif chunk[m.start()] == 0x22:  # closing quote
                    self._in_str = False
                    pos = m.end()
                elif m.end() < n:  # backslash: skip the escaped byte
                    pos = m.end() + 1
                else:
                    self._esc = True
                    pos = n
            else:
                m = _STRUCT.search(chunk, pos)
                if m is None:
                    pos = n
                    continue
                pos = m.end()
                c = chunk[m.start()]
                if c == 0x22:
                    self._in_str = True
                elif c == 0x7B or c == 0x5B:
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._element(chunk[elem:pos], out)
        if self._depth > 0 and not self._skipping:
            piece = chunk[elem:]
            self._held += len(piece)
            if self._held > self._max:
                self._pieces = []
                self._held = 0
                self._skipping = True
                self.oversized += 1
            else:
                self._pieces.append(piece)
        return out

    def _element(self, tail: bytes, out: list[Any]) -> None:
        if self._skipping:
            self._skipping = False
            return
        if self._pieces:
            self._pieces.append(tail)
            tail = b"".join(self._pieces)
            self._pieces = []
            self._held = 0
        if len(tail) > self._max:
            self.oversized += 1
            return
        try:
            out.append(orjson.loads(tail))
        except orjson.JSONDecodeError:
            self.invalid += 1


_TOP = re.compile(rb"[{\]]")
_IN_STR = re.compile(rb'["\\]')
_STRUCT = re.compile(rb'["{}\[\]]')
