"""Incremental Content-Encoding decoders (a chunk in, the decoded bytes out).

Each decoder caps the bytes it will produce for one body: past the cap it stops and reports
``failed = "decoded_too_large"`` (a decompression bomb is abandoned, never expanded). Corrupt input
sets ``failed`` too. Nothing raises: the traffic itself is never touched by decoding.
"""

from __future__ import annotations

import zlib

import brotli
import zstandard

# Errors each codec raises on corrupt input (and only those are caught).
_CODEC_ERRORS: tuple[type[Exception], ...] = (zlib.error, brotli.error, zstandard.ZstdError)


class Decoder:
    __slots__ = ("failed", "_left")

    def __init__(self, max_bytes: int) -> None:
        self.failed: str | None = None
        self._left = max_bytes

    def decode(self, chunk: bytes, per_call: int | None = None) -> bytes:
        """The bytes ``chunk`` decodes to. More than ``per_call`` of them (one ext_proc message's
        budget) sets ``failed = "message_budget"`` without decoding further."""
        if self.failed is not None or not chunk:
            return b""
        cap = self._left if per_call is None or per_call >= self._left else per_call
        try:
            out = self._decode(chunk, cap + 1)
        except _CODEC_ERRORS:
            self.failed = "corrupt"
            return b""
        if len(out) > cap:
            self.failed = "decoded_too_large" if cap == self._left else "message_budget"
            return b""
        self._left -= len(out)
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


class BrotliDecoder(Decoder):
    """br. brotli >= 1.2 bounds one call's output (``output_buffer_limit``). Older versions get
    the input in small slices; that bounds the input per call, not strictly the output (brotli
    can expand a few bytes a lot), so it is the weaker guarantee."""

    __slots__ = ("_d",)
    native_limit = hasattr(brotli.Decompressor, "can_accept_more_data")
    SLICE = 16  # input bytes per call without a native limit (a weaker bound: see class doc)

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._d = brotli.Decompressor()

    def _decode(self, chunk: bytes, limit: int) -> bytes:
        d = self._d
        out: list[bytes] = []
        got = 0
        if self.native_limit:
            piece = d.process(chunk, output_buffer_limit=limit)
            out.append(piece)
            got = len(piece)
            while got < limit and not d.can_accept_more_data():
                piece = d.process(b"", output_buffer_limit=limit - got)
                if not piece:
                    break
                out.append(piece)
                got += len(piece)
        else:
            view = memoryview(chunk)
            for i in range(0, len(view), self.SLICE):
                piece = d.process(view[i : i + self.SLICE])
                out.append(piece)
                got += len(piece)
                if got >= limit:
                    break
        return b"".join(out)


class ZstdDecoder(Decoder):
    """zstd. The streaming API has no output bound per call, so input goes in small slices: a
    block (at most 128 KiB out) needs at least a few input bytes, which bounds each call."""

    __slots__ = ("_d",)
    SLICE = 128  # input bytes per call: at most ~32 blocks (~4 MiB) come out of one call

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._d = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)

    def _decode(self, chunk: bytes, limit: int) -> bytes:
        out: list[bytes] = []
        got = 0
        view = memoryview(chunk)
        for i in range(0, len(view), self.SLICE):
            piece = self._d.decompress(view[i : i + self.SLICE])
            out.append(piece)
            got += len(piece)
            if got >= limit:
                break
        return b"".join(out)


class ChainDecoder(Decoder):
    """``Content-Encoding: a, b`` (applied a then b): decoded b first, then a; each capped."""

    __slots__ = ("_stages",)

    def __init__(self, max_bytes: int, stages: list[Decoder]) -> None:
        super().__init__(max_bytes)
        self._stages = stages

    def _decode(self, chunk: bytes, limit: int) -> bytes:
        for stage in self._stages:
            chunk = stage.decode(chunk, limit)
            if stage.failed is not None:
                self.failed = stage.failed
                return b""
            if not chunk:
                return b""
        return chunk


def _single(enc: str, max_bytes: int) -> Decoder | None:
    if enc in ("gzip", "x-gzip"):
        return ZlibDecoder(max_bytes, 31)
    if enc == "deflate":
        return ZlibDecoder(max_bytes, zlib.MAX_WBITS)
    if enc == "br":
        return BrotliDecoder(max_bytes)
    if enc == "zstd":
        return ZstdDecoder(max_bytes)
    return None


def make_decoder(content_encoding: str, max_bytes: int) -> Decoder | None:
    """A decoder for the header's value; None for identity. Unsupported: ``Decoder.failed`` set.

    A list (``gzip, br``: rare) is decoded last-applied first, every stage under the same cap.
    """
    names = [e.strip() for e in content_encoding.lower().split(",")]
    names = [e for e in names if e and e != "identity"]
    if not names:
        return None
    stages = [_single(e, max_bytes) for e in reversed(names)]
    if any(stage is None for stage in stages):
        unsupported = Decoder(max_bytes)
        unsupported.failed = "unsupported_encoding"
        return unsupported
    if len(stages) == 1:
        return stages[0]
    return ChainDecoder(max_bytes, [s for s in stages if s is not None])
