"""Completion is a protocol fact: a stream is complete at its API's end marker, never because some
usage went by. Every streamed provider case is cut at every byte (the parser) and at every
protocol unit (the servicer, hanging up or ended by the upstream there); the hang-up table pins
the outcome and the tokens every output reports."""

from __future__ import annotations

import pytest

from extproc.core.call import CLIENT_ABORT, ERROR, OK
from extproc.core.config import parse
from extproc.server.processor import Processor
from tests.support.provider_cases import BY_NAME, CASES, HANG_UPS, Case, HangUp, complete_offset, new_parser, units
from tests.unit.test_processor import Recorder, body, headers, meta, req_headers, run


def _streamed(case: Case) -> bool:
    return new_parser(case)[1].streaming and case.status < 400


STREAMS = [c for c in CASES if _streamed(c)]
IDS = [c.name for c in STREAMS]


def test_every_stream_names_its_end_marker() -> None:
    assert len(STREAMS) >= 15
    assert [c.name for c in STREAMS if c.complete_at is None] == []
    assert {c.name for c in CASES if c.complete_at is not None} == set(IDS)


@pytest.mark.parametrize("case", STREAMS, ids=IDS)
def test_complete_exactly_when_the_end_marker_arrives(case: Case) -> None:
    """Fed one byte at a time without end-of-stream: incomplete up to the last byte of the unit
    carrying the end marker, complete from there on (a hang-up at any earlier byte is an abort)."""
    data = case.load()
    at = complete_offset(case, data)
    parser, _ = new_parser(case)
    first = None
    for i in range(len(data)):
        parser.feed_response(data[i : i + 1], False)
        if parser.complete and first is None:
            first = i + 1
    assert first == at
    assert not parser.stream_error


@pytest.mark.parametrize("case", [c for c in CASES if not _streamed(c)], ids=lambda c: c.name)
def test_a_whole_body_is_complete_only_at_its_end(case: Case) -> None:
    data = case.load()
    parser, _ = new_parser(case)
    parser.feed_response(data, False)
    assert not parser.complete
    parser.feed_response(b"", True)
    assert parser.complete


def _messages(case: Case, chunks: list[bytes], end: bool) -> list:
    msgs = [
        req_headers(case.path),
        body("request_body", case.request or b"{}", end=True),
        headers("response_headers", **{":status": str(case.status), "content-type": case.content_type}),
    ]
    msgs += [body("response_body", c, end=end and i == len(chunks) - 1) for i, c in enumerate(chunks)]
    if end and not chunks:
        msgs.append(body("response_body", b"", end=True))
    return msgs


def _agree(replies: list, call) -> None:
    """The access log (the last metadata handed to Envoy) says what the counters and spans read."""
    last = [meta(r) for r in replies if meta(r)][-1]
    assert last["outcome"] == call.outcome
    u = call.obs.usage
    assert (last.get("prompt_tokens"), last.get("completion_tokens"), last.get("total_tokens")) == (
        u.input_tokens,
        u.output_tokens,
        u.total(),
    )


@pytest.mark.parametrize("case", STREAMS, ids=IDS)
def test_hang_up_or_upstream_end_at_every_unit_boundary(case: Case) -> None:
    data = case.load()
    at = complete_offset(case, data)
    parts = [raw for raw, _ in units(data, case.content_type)]
    for k in range(len(parts) + 1):
        done = sum(map(len, parts[:k])) >= at
        for ended_by_upstream in (False, True):
            rec = Recorder()
            replies = run(Processor(parse({}), [rec]), _messages(case, parts[:k], ended_by_upstream), abort=not ended_by_upstream)
            (call,) = rec.calls
            want = OK if done else ERROR if ended_by_upstream else CLIENT_ABORT
            assert call.outcome == want, (k, ended_by_upstream)
            if want == ERROR:
                assert call.obs.error_type == "incomplete_stream"
            _agree(replies, call)


@pytest.mark.parametrize("h", HANG_UPS, ids=[f"{h.case}-{h.point}" for h in HANG_UPS])
def test_hang_up_table(h: HangUp) -> None:
    case = BY_NAME[h.case]
    rec = Recorder()
    replies = run(Processor(parse({}), [rec]), _messages(case, h.cut(case.load()), False), abort=True)
    (call,) = rec.calls
    assert call.outcome == h.outcome
    u = call.obs.usage
    assert (u.input_tokens, u.output_tokens, u.total()) == h.tokens
    _agree(replies, call)


def test_anthropic_message_start_output_is_a_placeholder_until_the_stream_completes() -> None:
    """Used only when a complete stream gave no message_delta output count."""
    from tests.support.provider_cases import sse

    start = {"type": "message_start", "message": {"model": "c", "usage": {"input_tokens": 7, "output_tokens": 3}}}
    case = BY_NAME["anthropic_stream_basic"]
    parser, obs = new_parser(case)
    parser.feed_response(sse(("message_start", start)), False)
    assert (obs.usage.input_tokens, obs.usage.output_tokens) == (7, None)
    parser.feed_response(sse(("message_stop", {"type": "message_stop"})), False)
    assert parser.complete and obs.usage.output_tokens == 3
