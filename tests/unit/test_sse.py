from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.codecs.sse import SSEDecoder

RAW = (
    b": keep-alive comment\n"
    b'event: response.created\r\ndata: {"a":1}\r\n\r\n'
    b"data: line one\ndata: line two\n\n"
    b"data:no-space\r\rdata: [DONE]\n\n"
)
EXPECTED = [(b"response.created", b'{"a":1}'), (b"", b"line one\nline two"), (b"", b"no-space"), (b"", b"[DONE]")]


def decode(chunks: list[bytes], max_line: int = 1 << 20) -> tuple[list, SSEDecoder]:
    d = SSEDecoder(max_line)
    out = []
    for c in chunks:
        out.extend(d.decode(c))
    out.extend(d.flush())
    return out, d


def test_every_split_point_gives_the_same_events():
    for i in range(len(RAW) + 1):
        assert decode([RAW[:i], RAW[i:]])[0] == EXPECTED, i
    assert decode([bytes([b]) for b in RAW])[0] == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RAW)), max_size=12))
def test_arbitrary_chunking(cuts):
    cuts = sorted(set(cuts))
    pieces = [RAW[a:b] for a, b in zip([0, *cuts], [*cuts, len(RAW)])]
    assert decode(pieces)[0] == EXPECTED


def test_unterminated_last_event_is_flushed():
    assert decode([b"data: tail"])[0] == [(b"", b"tail")]


def test_oversized_line_is_dropped_and_counted_without_losing_later_events():
    huge = b"data: " + b"x" * 5000
    events, d = decode([huge[:3000], huge[3000:], b"\n\n", b"data: ok\n\n"], max_line=1024)
    assert events == [(b"", b"ok")]
    assert d.oversized == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_never_raises_on_arbitrary_bytes(chunks):
    decode(chunks, max_line=128)


def _without_shortcut(chunks: list[bytes], max_line: int) -> tuple[list, int, int]:
    """The reference: each chunk ending in a blank line fed as two, its last byte apart (the
    same lines and events to the loop, never a whole event in one chunk, so never the shortcut)."""
    d = SSEDecoder(max_line)
    out = []
    for c in chunks:
        for piece in (c[:-1], c[-1:]) if c.endswith(b"\n\n") else (c,):
            out.extend(d.decode(piece))
    return out, d.oversized, d.held


PIECES = [b"data: ", b"{}", b"x" * 40, b"\n", b"\n\n", b"\r", b"\r\n", b"event: e\n", b": c\n", b"data:x", b"data: [DONE]"]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(lambda v: b"data: " + v + b"\n\n", st.sampled_from([b"{}", b"x" * 40, b"", b"a:b", b" y"])),
            st.lists(st.sampled_from(PIECES), max_size=6).map(b"".join),
        ),
        max_size=12,
    ),
    st.sampled_from([8, 40, 1 << 20]),
)
def test_whole_one_line_events_decode_as_without_the_shortcut(chunks, max_line):
    """A chunk that is one whole ``data:`` event (the common one) takes a shortcut: the events,
    what was dropped and what is held must be what the loop gives, whatever
    came before (a partial line, an event with its name, a pending "\\r", an oversized line)."""
    d = SSEDecoder(max_line)
    out = [e for c in chunks for e in d.decode(c)]
    assert (out, d.oversized, d.held) == _without_shortcut(chunks, max_line)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=6).map(b"".join), max_size=12), st.sampled_from([8, 40, 1 << 20]))
def test_held_is_the_unfinished_line_and_event_after_every_call(chunks, max_line):
    """``held`` (a plain attribute, read per chunk) is, after each ``decode`` and ``flush``, the
    bytes of the unfinished line as received plus the data of the unfinished event."""
    d = SSEDecoder(max_line)
    for c in chunks:
        d.decode(c)
        line = 0 if d._dropping else sum(map(len, d._pieces))
        assert d.held == line + sum(len(v) + 1 for v in d._data)
    d.flush()
    assert d.held == 0
