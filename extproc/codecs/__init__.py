"""Byte-level codecs under the parsers: Content-Encoding (``encodings``) and the stream framings.

Every framing is an incremental decoder with one small interface (:class:`Framing`), whatever
the wire format: ``decode(chunk)`` returns the items the chunk completes, ``flush()`` the ones an
unterminated end of body still makes, ``held`` the bytes kept between chunks (capped), and a
few counters of what was refused (``oversized``...). None of them raises on bad input.

- ``sse``: server-sent events -> ``(event name, data)``;
- ``ndjson``: newline-delimited JSON -> each non-blank line (bytes; the parser filters, then parses);
- ``json_array``: a top-level JSON array streamed element by element -> each parsed element;
- ``eventstream``: AWS ``application/vnd.amazon.eventstream`` -> ``Message`` (headers, payload).
"""

from __future__ import annotations

from typing import Any, Protocol


class Framing(Protocol):
    """The interface every stream framing decoder implements."""

    @property
    def held(self) -> int:
        """Bytes held between chunks (an unfinished line, event, element or frame)."""
        ...

    def decode(self, chunk: bytes) -> list[Any]:
        """The items ``chunk`` completes, in order."""
        ...

    def flush(self) -> list[Any]:
        """End of body: what an unterminated last item still makes (may be nothing)."""
        ...
