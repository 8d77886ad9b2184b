"""Incremental Content-Encoding decoders (a chunk in, the decoded bytes out).

Each decoder caps the bytes it will produce for one body: past the cap it stops and reports
``failed = "decoded_too_large"`` (a decompression bomb is abandoned, never expanded). Corrupt input
sets ``failed`` too. Nothing raises: the traffic itself is never touched by decoding.
"""
from __future__ import annotations

import zlib


class Decoder:
    __slots__ = ("failed", "_left")

    def __init__(self, max_bytes: int) -> None:
        self.failed: str | None = None
        self._left = max_bytes

    def decode(self, chunk: bytes) -> bytes:
        if self.failed is not None or not chunk:
            return b""
        try:
            out = self._decode(chunk, self._left + 1)
        except Exception:  # each codec library raises its own error types on corrupt input
            self.failed = "corrupt"
            return b""
        self._left -= len(out)
        if self._left < 0:
            self.failed = "decoded_too_large"
            return b""
        return out

    def _decode(self, chunk: bytes, limit: int) -> bytes:
        raise NotImplementedError


class ZlibDecoder(Decoder):
    """gzip (wbits 31) and deflate (zlib-wrapped, or raw as some servers send it)."""

    __slots__ = ("_z", "_raw_fallback")

    def __init__(self, max_bytes: int, wbits: int) -> None:
        super().__init__(max_bytes)
        self._z = zlib.decompressobj(wbits)
        self._raw_fallback = wbits == zlib.MAX_WBITS

    def _decode(self, chunk: bytes, limit: int) -> bytes:
        try:
            out = self._z.decompress(chunk, limit)
        except zlib.error:
            if not self._raw_fallback:
                raise
            self._raw_fallback = False
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._z.decompress(chunk, limit)
        self._raw_fallback = False
        if self._z.unconsumed_tail:  # more output than the cap allows
            return out + b"\0" * (limit - len(out) + 1)
        return out


def make_decoder(content_encoding: str, max_bytes: int) -> Decoder | None:
    """A decoder for the header's value; None for identity. Unsupported: ``Decoder.failed`` set."""
    enc = content_encoding.strip().lower()
    if not enc or enc == "identity":
        return None
    if enc in ("gzip", "x-gzip"):
        return ZlibDecoder(max_bytes, 31)
    if enc == "deflate":
        return ZlibDecoder(max_bytes, zlib.MAX_WBITS)
    unsupported = Decoder(max_bytes)
    unsupported.failed = "unsupported_encoding"
    return unsupported
