"""Content-Encoding decoders: round trips, corrupt input, lists, and decompression bombs."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Iterator

import brotli
import pytest
import zstandard

from extproc.codecs import encodings
from extproc.codecs.encodings import BrotliDecoder, make_decoder

GIB = 1 << 30
MIB = 1 << 20
CAP = 8 * MIB


def _zeros_stream() -> Iterator[bytes]:
    block = bytes(MIB)
    for _ in range(GIB // MIB):
        yield block


def _gzip_bomb() -> bytes:
    """1 GiB of zeros as gzip. Each MiB ends with a full flush, which makes every MiB after the
    first compress to identical bytes: compressed once, repeated (no trailer: never reached)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    head = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    unit = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return head + unit * (GIB // MIB - 1)


def _br_bomb() -> bytes:
    c = brotli.Compressor(quality=5)
    return b"".join(c.process(b) for b in _zeros_stream()) + c.finish()


def _zstd_bomb() -> bytes:
    c = zstandard.ZstdCompressor(level=3).compressobj()
    return b"".join(c.compress(b) for b in _zeros_stream()) + c.flush()


_BOMBS = {"gzip": _gzip_bomb, "br": _br_bomb, "zstd": _zstd_bomb}


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {name: make() for name, make in _BOMBS.items()}


@pytest.mark.parametrize("chunk_size", [None, 16 << 10, 97])
@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_one_gib_bomb_is_abandoned_fast_and_small(bombs: dict[str, bytes], encoding: str, chunk_size: int | None) -> None:
    bomb = bombs[encoding]
    assert len(bomb) < 2 * MIB  # a small body that would expand to 1 GiB
    decoder = make_decoder(encoding, CAP)
    assert decoder is not None
    size = chunk_size or len(bomb)
    decoded = 0
    fed = 0
    tracemalloc.start()
    start = time.thread_time()  # CPU time: what decoding costs, not the waits for a CPU of a loaded machine
    try:
        for i in range(0, len(bomb), size):
            decoded += len(decoder.decode(bomb[i : i + size]))
            fed += 1
            if decoder.failed:
                break
        cpu = time.thread_time() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.failed == "decoded_too_large"
    assert decoded <= CAP
    assert decoder.decode(b"more") == b""  # stays failed
    assert cpu < 2.0, cpu
    assert peak < 4 * CAP, peak  # never near the 1 GiB it would expand to


def test_brotli_without_native_output_limit_still_bounded(bombs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """brotli < 1.2 has no output_buffer_limit: the slicing fallback must bound it too."""
    monkeypatch.setattr(BrotliDecoder, "native_limit", False)
    decoder = make_decoder("br", CAP)
    assert isinstance(decoder, BrotliDecoder)
    tracemalloc.start()
    try:
        out = decoder.decode(bombs["br"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == b""
    assert decoder.failed == "decoded_too_large"
    assert peak < 8 * CAP, peak


def test_brotli_fallback_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BrotliDecoder, "native_limit", False)
    body = b"data: {}\n\n" * 5000
    decoder = make_decoder("br", MIB)
    assert decoder is not None
    packed = brotli.compress(body)
    assert b"".join(decoder.decode(packed[i : i + 1000]) for i in range(0, len(packed), 1000)) == body


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "br", "zstd", "BR", " zstd "])
def test_exactly_at_cap_is_fine_one_over_fails(encoding: str) -> None:
    body = bytes(range(256)) * 64  # 16 KiB
    name = encoding.strip().lower()
    packed = {
        "gzip": gzip.compress,
        "x-gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }[name](body)
    ok = make_decoder(encoding, len(body))
    assert ok is not None and ok.decode(packed) == body and ok.failed is None
    over = make_decoder(encoding, len(body) - 1)
    assert over is not None
    over.decode(packed)
    assert over.failed == "decoded_too_large"


def test_raw_deflate_is_accepted() -> None:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = c.compress(b"hello world" * 10) + c.flush()
    decoder = make_decoder("deflate", MIB)
    assert decoder is not None
    assert decoder.decode(packed) == b"hello world" * 10


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_corrupt_input_fails_without_raising(encoding: str) -> None:
    decoder = make_decoder(encoding, MIB)
    assert decoder is not None
    assert decoder.decode(b"\x00\xffthis is not compressed data at all" * 4) == b""
    assert decoder.failed == "corrupt"


def test_zstd_multiple_frames() -> None:
    c = zstandard.ZstdCompressor()
    decoder = make_decoder("zstd", MIB)
    assert decoder is not None
    assert decoder.decode(c.compress(b"one ") + c.compress(b"two")) == b"one two"


def test_identity_and_unsupported() -> None:
    assert make_decoder("", MIB) is None
    assert make_decoder("identity", MIB) is None
    unknown = make_decoder("compress", MIB)
    assert unknown is not None and unknown.failed == "unsupported_encoding"
    mixed = make_decoder("gzip, lzma", MIB)
    assert mixed is not None and mixed.failed == "unsupported_encoding"


def test_encoding_list_decodes_in_reverse_order() -> None:
    body = b'{"usage": {"prompt_tokens": 3}}' * 50
    packed = brotli.compress(gzip.compress(body))  # Content-Encoding: gzip, br
    decoder = make_decoder("gzip, br", MIB)
    assert isinstance(decoder, encodings.ChainDecoder)
    assert b"".join(decoder.decode(packed[i : i + 10]) for i in range(0, len(packed), 10)) == body
    single = make_decoder("gzip, identity", MIB)
    assert isinstance(single, encodings.ZlibDecoder)


def test_encoding_list_respects_cap() -> None:
    packed = brotli.compress(gzip.compress(bytes(4 * MIB)))
    decoder = make_decoder("gzip, br", MIB)
    assert decoder is not None
    decoder.decode(packed)
    assert decoder.failed == "decoded_too_large"
