"""Every provider case (recorded fixtures and documented-format bodies) parses to its ground truth,
whatever the chunking, and through every Content-Encoding we decode."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

import brotli
import pytest
import zstandard

from extproc.codecs.encodings import make_decoder
from tests.support.provider_cases import CASES, Case, check, run, summary

IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_whole_body(case: Case, load_case: Callable[[Case], bytes]) -> None:
    check(case, run(case, [load_case(case)]))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_two_piece_split(case: Case, load_case: Callable[[Case], bytes]) -> None:
    body = load_case(case)
    want = summary(run(case, [body]))
    for i in range(len(body) + 1):
        got = summary(run(case, [body[:i], body[i:]]))
        assert got == want, f"split at {i}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_byte_at_a_time(case: Case, load_case: Callable[[Case], bytes]) -> None:
    body = load_case(case)
    obs = run(case, [body[i : i + 1] for i in range(len(body))])
    check(case, obs)
    assert summary(obs) == summary(run(case, [body]))


def _compress(encoding: str, body: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    if encoding == "br":
        return brotli.compress(body)
    return zstandard.ZstdCompressor().compress(body)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compressed(case: Case, encoding: str, load_case: Callable[[Case], bytes]) -> None:
    body = load_case(case)
    packed = _compress(encoding, body)
    want = summary(run(case, [body]))
    for size in (1, 7, 64, 4096):
        decoder = make_decoder(encoding, 1 << 20)
        assert decoder is not None
        chunks = [decoder.decode(packed[i : i + size]) for i in range(0, len(packed), size)]
        assert decoder.failed is None
        assert b"".join(chunks) == body
        assert summary(run(case, chunks)) == want, f"{encoding} chunk size {size}"
