"""Every stream framing in extproc.codecs has the same incremental interface and gives the same
items whatever the chunking; NDJSON's line cap drops an oversized line and keeps the next."""

from __future__ import annotations

import pytest

from extproc.codecs.eventstream import EventStreamDecoder
from extproc.codecs.json_array import JsonArrayDecoder
from extproc.codecs.ndjson import NDJSONDecoder
from extproc.codecs.sse import SSEDecoder
from tests.support.provider_cases import event_frame

BODIES = {
    "sse": (lambda: SSEDecoder(1 << 20), b'event: a\ndata: {"x":1}\n\ndata: 2\r\n\r\ndata: last'),
    "ndjson": (lambda: NDJSONDecoder(1 << 20), b'{"a":1}\n\n  {"b":2}  \r\n{"c":3}'),
    "json_array": (lambda: JsonArrayDecoder(1 << 20), b'[{"a":"}{\\""},\r\n{"b":[1,{"c":2}]}]'),
    "eventstream": (lambda: EventStreamDecoder(), event_frame("chunk", {"a": 1}) + event_frame("metadata", {})),
}


def _items(make, chunks):
    decoder = make()
    out = []
    for chunk in chunks:
        out += decoder.decode(chunk)
    out += decoder.flush()
    return out, decoder


@pytest.mark.parametrize("name", BODIES)
def test_same_items_whatever_the_chunking_and_nothing_held_after(name):
    make, body = BODIES[name]
    whole, decoder = _items(make, [body])
    assert whole and decoder.held == 0
    bytewise, decoder = _items(make, [body[i : i + 1] for i in range(len(body))])
    assert bytewise == whole and decoder.held == 0
    for cut in range(len(body) + 1):
        assert _items(make, [body[:cut], body[cut:]])[0] == whole, cut


def test_ndjson_lines_are_stripped_and_blank_ones_skipped():
    assert _items(BODIES["ndjson"][0], [BODIES["ndjson"][1]])[0] == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_ndjson_an_oversized_line_is_dropped_counted_and_the_next_kept():
    decoder = NDJSONDecoder(max_line=8)
    assert decoder.decode(b'{"a":"0123') == [] and decoder.held == 0 and decoder.oversized == 1
    assert decoder.decode(b'456789"}\n{"b":1}\n') == [b'{"b":1}']
    assert decoder.oversized == 1 and decoder.flush() == []
