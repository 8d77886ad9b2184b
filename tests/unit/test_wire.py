"""``wire.response_body_only``: a streamed chunk's ext_proc message read from its bytes, checked
against protobuf's own parse; and the Processor handling such a chunk from its body as it
handles the parsed message."""

from __future__ import annotations

import random

import pytest

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core.config import parse
from extproc.server.processor import Processor
from extproc.server.wire import response_body_only
from tests.unit.test_processor import Recorder, body, headers, req_headers

LENGTHS = [
    0,
    1,
    2,
    60,
    120,
    121,
    122,
    123,
    124,
    125,
    126,
    127,
    128,
    129,
    300,
    16376,
    16377,
    16378,
    16379,
    16380,
    16381,
    16383,
    16384,
    20000,
]


def _only_body(data: bytes) -> bytes | None:
    """What protobuf reads in ``data``: the body if the message is a response body with a
    non-empty body and nothing else (re-serialised, it is exactly that message), else None."""
    try:
        req = pb.ProcessingRequest.FromString(data)
    except Exception:
        return None
    b = req.response_body.body
    exact = pb.ProcessingRequest(response_body=pb.HttpBody(body=b)).SerializeToString()
    return b if b and req.SerializeToString() == exact else None


def _messages() -> list[bytes]:
    out = []
    for n in LENGTHS:
        chunk = b"d" * n
        for end in (False, True):
            out.append(body("response_body", chunk, end).SerializeToString())
            out.append(body("request_body", chunk, end).SerializeToString())
        out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk), observability_mode=True).SerializeToString())
        with_md = pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk))
        with_md.metadata_context.filter_metadata["x"].fields["k"].string_value = "v"
        out.append(with_md.SerializeToString())
        with_attrs = pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk))
        with_attrs.attributes["envoy.filters.http.ext_proc"].fields["k"].string_value = "v"
        out.append(with_attrs.SerializeToString())
    out.append(headers("response_headers", **{":status": "200"}).SerializeToString())
    out.append(b"")
    return out


def test_a_response_body_alone_is_read_from_its_bytes_as_protobuf_reads_it():
    """Every message protobuf reads as a response body chunk and nothing else (one- and
    two-byte lengths) gives its body; every other message gives None."""
    for data in _messages():
        got = response_body_only(data)
        want = _only_body(data)
        if len(data) < 16384:  # (a longer body's lengths take three varint bytes: left to protobuf)
            assert got == want, data[:8]
        else:
            assert got is None or got == want


@pytest.mark.parametrize("seed", range(20))
def test_odd_encodings_are_never_misread(seed):
    """Cut, altered and rearranged encodings (non-minimal varints, a repeated field, an unknown
    field, garbage): whatever ``response_body_only`` returns is what protobuf reads."""
    rnd = random.Random(seed)
    base = [m for m in _messages() if m]
    for _ in range(300):
        data = bytearray(rnd.choice(base)[: rnd.randint(0, 200)] if rnd.random() < 0.3 else rnd.choice(base)[:300])
        for _ in range(rnd.randint(0, 3)):
            if data:
                data[rnd.randrange(len(data))] = rnd.choice([0x2A, 0x0A, 0x80, 0x81, 0x00, 0x01, 0x7F, rnd.randrange(256)])
        if rnd.random() < 0.2:
            data = bytearray(b"\x2a\x85\x00\x0a\x03abc")  # a non-minimal length: protobuf reads it
        if rnd.random() < 0.1:
            data += b"\x0a\x01x"  # a repeated field
        got = response_body_only(bytes(data))
        if got is not None:
            assert got == _only_body(bytes(data)), bytes(data)
    assert response_body_only(b"\x2a\x85\x00\x0a\x03abc") == b"abc" == _only_body(b"\x2a\x85\x00\x0a\x03abc")


CHUNKS = [
    b'data: {"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b'data: {"id":"c","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n',
    b"data: [DONE]\n\n",
    b"data: {not json\n\n",
    b"data: partial",
    b"\n\nevent: x\ndata: {}\n\n",
]


def _reply(reply: bytes | None) -> object:
    """A reply, its metadata's timings left out (they differ from run to run)."""
    if reply is None:
        return None
    from google.protobuf.json_format import MessageToDict

    msg = pb.ProcessingResponse.FromString(reply)
    md = MessageToDict(msg.dynamic_metadata)
    for fields in md.values():
        for key in [k for k in fields if k.endswith("_ms")]:
            del fields[key]
    msg.ClearField("dynamic_metadata")
    return (msg.SerializeToString(), md)


def _calls(messages: list[pb.ProcessingRequest], from_bytes: bool) -> tuple[list, list]:
    rec = Recorder()
    p = Processor(parse({}), [rec])
    s = p.open_stream({})
    replies, shortcuts = [], 0
    for m in messages:
        data = m.SerializeToString()
        chunk = response_body_only(data) if from_bytes else None
        if chunk is not None:
            shortcuts += 1
            replies.append(_reply(s.handle_body_chunk(chunk)))
        else:
            replies.append(_reply(s.handle(pb.ProcessingRequest.FromString(data))))
    p.close_stream(s)
    (c,) = rec.calls
    call = (
        c.outcome,
        c.status,
        c.response_bytes,
        c.first_chunk is not None,
        c.obs.usage,
        c.obs.response_model,
        c.obs.finish_reasons,
        c.obs.parse_errors,
    )
    return [replies, call, s.end_stream], [shortcuts]


@pytest.mark.parametrize("seed", range(30))
def test_a_chunk_handled_from_its_bytes_gets_the_reply_and_leaves_the_state_handle_does(seed):
    """A stream's messages, each streamed chunk handled by ``handle_body_chunk`` from its body:
    the same replies, call and end of stream as ``handle`` of each parsed message, with or
    without response headers first (fewer-messages mode: the first body message starts the
    response), in observability mode, with an end of stream, Content-Length or an encoding."""
    rnd = random.Random(seed)
    response = {":status": rnd.choice(["200", "429"]), "content-type": rnd.choice(["text/event-stream", "application/json"])}
    if rnd.random() < 0.3:
        response["content-length"] = str(rnd.randint(50, 400))
    if rnd.random() < 0.1:
        response["content-encoding"] = "gzip"
    messages = [req_headers(), body("request_body", b'{"model":"gpt-4o","stream":true}', end=True)]
    if rnd.random() < 0.8:
        messages.append(headers("response_headers", **response))
    for _ in range(rnd.randint(1, 12)):
        messages.append(body("response_body", rnd.choice(CHUNKS), end=rnd.random() < 0.05))
    if rnd.random() < 0.5:
        messages.append(body("response_body", b"", end=True))
    if rnd.random() < 0.2:
        for m in messages:
            m.observability_mode = True
    (replies, call, end), (shortcuts,) = _calls(messages, True)
    assert [replies, call, end] == _calls(messages, False)[0]
    assert shortcuts > 0 or not any(
        m.HasField("response_body") and m.response_body.body and not m.response_body.end_of_stream and not m.observability_mode
        for m in messages
    )
