"""``wire.response_body_only``: a streamed chunk's ext_proc message read from its bytes, checked
against protobuf's own parse; and the Processor handling such a chunk from its body as it
handles the parsed message."""

from __future__ import annotations

import random

import pytest
from google.protobuf.json_format import MessageToDict

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


def _only_body(data: bytes, context: bool = False) -> bytes | None:
    """What protobuf reads in ``data``: the body if the message is a response body with a
    non-empty body and nothing else (re-serialised, it is exactly that message), else None;
    with ``context``, also if a metadata context is all it holds besides."""
    try:
        req = pb.ProcessingRequest.FromString(data)
    except Exception:
        return None
    b = req.response_body.body
    exact = pb.ProcessingRequest(response_body=pb.HttpBody(body=b)).SerializeToString()
    if context:
        req.ClearField("metadata_context")
    return b if b and req.SerializeToString() == exact else None


def _with_context(m: pb.ProcessingRequest, claims: bool = False) -> pb.ProcessingRequest:
    """``m`` with the ``metadata_context`` Envoy adds to every message when it forwards metadata
    namespaces: empty when there is nothing to forward (the serialised field ``42 00`` at the
    end), else jwt_authn's claims."""
    m = pb.ProcessingRequest.FromString(m.SerializeToString())
    m.metadata_context.SetInParent()
    if claims:
        m.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].fields["sub"].string_value = "team-a"
    return m


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
        for claims in (False, True):
            out.append(_with_context(body("response_body", chunk), claims).SerializeToString())
            out.append(_with_context(body("response_body", chunk, True), claims).SerializeToString())
            out.append(_with_context(with_attrs, claims).SerializeToString())
            observed = _with_context(body("response_body", chunk), claims)
            observed.observability_mode = True
            out.append(observed.SerializeToString())
        big = pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk))
        big.metadata_context.filter_metadata["x"].fields["k"].string_value = "v" * 20000  # a three-byte length
        out.append(big.SerializeToString())
    out.append(headers("response_headers", **{":status": "200"}).SerializeToString())
    out.append(b"")
    return out


def test_a_response_body_alone_is_read_from_its_bytes_as_protobuf_reads_it():
    """Every message protobuf reads as a response body chunk and nothing else (one- and
    two-byte lengths) gives its body; every other message gives None."""
    for data in _messages():
        for context in (False, True):
            got = response_body_only(data, context)
            want = _only_body(data, context)
            if len(data) < 16384:  # (a longer body's lengths take three varint bytes: left to protobuf)
                assert got == want, (context, data[:8])
            else:
                assert got is None or got == want


def test_envoys_chunk_message_with_its_metadata_context_is_read_from_its_bytes_only_when_asked():
    """Envoy's message for a streamed chunk with forwarding namespaces configured (as the
    generated config does): the body, then an empty metadata context (``42 00``), or the
    forwarded claims. Read with ``context`` (the call already holds what was forwarded); without
    it, left to protobuf, so ``Stream.handle`` can read the context."""
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    empty = _with_context(body("response_body", chunk)).SerializeToString()
    assert empty.endswith(b"\x42\x00")
    claims = _with_context(body("response_body", chunk), claims=True).SerializeToString()
    for data in (empty, claims):
        assert response_body_only(data, True) == chunk
        assert response_body_only(data) is None
        assert response_body_only(data[:-1], True) is None  # cut
        assert response_body_only(data + b"\x42\x00", True) is None  # a repeated context
        assert response_body_only(data + b"\x50\x01", True) is None  # observability mode after it


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
        got = response_body_only(bytes(data), True)
        if got is not None:
            try:
                pb.ProcessingRequest.FromString(bytes(data))
            except Exception:  # the context's content is not read: what comes before it is a chunk
                assert any(response_body_only(bytes(data[:k])) == got for k in range(len(data))), bytes(data)
            else:
                assert got == _only_body(bytes(data), True), bytes(data)
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
        chunk = response_body_only(data, s.call.forwarded is not None) if from_bytes else None  # as ``_Exchange.one``
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
        None if c.forwarded is None else {k: MessageToDict(v) for k, v in c.forwarded.items()},
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
    context = rnd.random()
    if context < 0.5:  # Envoy forwarding metadata namespaces: a context on every message, or from some on
        claims = rnd.random() < 0.5
        first = 0 if context < 0.3 else rnd.randrange(len(messages))
        messages = messages[:first] + [_with_context(m, claims) for m in messages[first:]]
    (replies, call, end), (shortcuts,) = _calls(messages, True)
    assert [replies, call, end] == _calls(messages, False)[0]
    eligible = sum(
        1
        for m in messages
        if m.HasField("response_body") and m.response_body.body and not m.response_body.end_of_stream and not m.observability_mode
    )
    if context < 0.3 or context >= 0.5:  # a context on every message, or on none: every chunk read from its bytes
        assert shortcuts == eligible
