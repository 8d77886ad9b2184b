"""The streamed JSON-array splitter (Gemini's default streamGenerateContent framing)."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.codecs.json_array import JsonArrayDecoder

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(alphabet=st.sampled_from('ab{}[]",\\\n é')),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


def _split_feed(data: bytes, cuts: list[int]) -> tuple[list[object], JsonArrayDecoder]:
    s = JsonArrayDecoder(1 << 20)
    out: list[object] = []
    prev = 0
    for cut in sorted(set(c for c in cuts if 0 <= c <= len(data))) + [len(data)]:
        out += s.decode(data[prev:cut])
        prev = cut
    return out, s


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), _json, max_size=4), max_size=5), st.lists(st.integers(0, 400)))
def test_any_split_gives_the_elements(elements: list[dict[str, object]], cuts: list[int]) -> None:
    data = b"[" + b",\n".join(orjson.dumps(e) for e in elements) + b"]"
    out, s = _split_feed(data, cuts)
    assert out == elements
    assert s.complete and s.invalid == 0 and s.oversized == 0


def test_escaped_quote_and_backslash_at_chunk_edges() -> None:
    data = b'[{"t": "a\\"}{[\\\\"}, {"u": 1}]'
    for i in range(len(data) + 1):
        out, s = _split_feed(data, [i])
        assert out == [{"t": 'a"}{[\\'}, {"u": 1}], i
        assert s.complete


def test_oversized_element_is_skipped_and_the_next_still_parses() -> None:
    big = orjson.dumps({"x": "{" * 5000})
    data = b"[" + big + b"," + b'{"ok": true}' + b"]"
    s = JsonArrayDecoder(1000)
    out = []
    for i in range(0, len(data), 300):
        out += s.decode(data[i : i + 300])
    assert out == [{"ok": True}]
    assert s.oversized == 1 and s.complete


def test_invalid_element_is_counted() -> None:
    s = JsonArrayDecoder(1000)
    assert s.decode(b'[{"a": 1,}, {"b": 2}]') == [{"b": 2}]
    assert s.invalid == 1


@pytest.mark.parametrize("chunk", [1 << 10, 64 << 10])
def test_scans_megabytes_quickly(chunk: int) -> None:
    element = orjson.dumps({"candidates": [{"content": {"parts": [{"text": "word " * 200}]}}]})
    data = b"[" + b",".join([element] * 4000) + b"]"  # ~4 MB
    s = JsonArrayDecoder(1 << 20)
    start = time.thread_time()  # CPU time: what scanning costs, not the waits for a CPU of a loaded machine
    n = sum(len(s.decode(data[i : i + chunk])) for i in range(0, len(data), chunk))
    cpu = time.thread_time() - start
    assert n == 4000
    assert cpu < 1.0, f"{cpu:.2f} s of CPU"
