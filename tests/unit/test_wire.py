"""``wire.response_body_only``: a streamed chunk's ext_proc message read from its bytes (in the
default mode and, with the flag Envoy sets last, in observability mode), checked against
protobuf's own parse; and the Processor handling such a chunk from its body as it handles the
parsed message."""

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


def _only_body(data: bytes, context: bool = False, observed: bool = False) -> bytes | None:
    """What protobuf reads in ``data``: the body if the message is a response body with a
    non-empty body and nothing else (re-serialised, it is exactly that message), else None;
    with ``context``, also if a metadata context is all it holds besides; with ``observed``,
    only if it holds ``observability_mode`` set besides."""
    try:
        req = pb.ProcessingRequest.FromString(data)
    except Exception:
        return None
    b = req.response_body.body
    exact = pb.ProcessingRequest(response_body=pb.HttpBody(body=b)).SerializeToString()
    if context:
        req.ClearField("metadata_context")
    if observed:
        if not req.observability_mode:
            return None
        req.ClearField("observability_mode")
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
            for m in (body("response_body", chunk), body("response_body", chunk, True), with_attrs):
                observed = _with_context(m, claims)
                observed.observability_mode = True
                out.append(observed.SerializeToString())
        out.append(
            pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=True), observability_mode=True).SerializeToString()
        )
        out.append(pb.ProcessingRequest(request_body=pb.HttpBody(body=chunk), observability_mode=True).SerializeToString())
        with_attrs.observability_mode = True
        out.append(with_attrs.SerializeToString())
        big = pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk))
        big.metadata_context.filter_metadata["x"].fields["k"].string_value = "v" * 20000  # a three-byte length
        out.append(big.SerializeToString())
    out.append(headers("response_headers", **{":status": "200"}).SerializeToString())
    out.append(b"")
    return out


def test_a_response_body_alone_is_read_from_its_bytes_as_protobuf_reads_it():
    """Every message protobuf reads as a response body chunk and nothing else (one- and
    two-byte lengths) gives its body, or with ``observed`` such a message with
    ``observability_mode`` set; every other message gives None."""
    messages = _messages()
    assert sum(1 for m in messages if _only_body(m, observed=True)) >= len(LENGTHS) - 1  # (all but the empty body)
    for data in messages:
        for context in (False, True):
            for observed in (False, True):
                got = response_body_only(data, context, observed)
                want = _only_body(data, context, observed)
                if len(data) < 16384:  # (a longer body's lengths take three varint bytes: left to protobuf)
                    assert got == want, (context, observed, data[:8])
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
        assert response_body_only(data, True, observed=True) is None  # without it


def test_envoys_chunk_message_in_observability_mode_is_read_from_its_bytes_with_the_flag_last():
    """Envoy in observability mode builds a chunk's message (the body, its metadata context)
    and sets ``observability_mode`` on it, serialised in field order: ``50 01`` last, after the
    context. Read with ``observed`` (and ``context`` where the context is there); the flag
    elsewhere or encoded otherwise is left to protobuf."""
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    plain = pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk), observability_mode=True).SerializeToString()
    assert plain.endswith(b"\x50\x01")
    assert response_body_only(plain, observed=True) == chunk
    assert response_body_only(plain) is None  # the default mode's reading: not a chunk alone
    for claims in (False, True):
        m = _with_context(body("response_body", chunk), claims)
        m.observability_mode = True
        data = m.SerializeToString()
        assert data == _with_context(body("response_body", chunk), claims).SerializeToString() + b"\x50\x01"
        assert response_body_only(data, True, True) == chunk
        assert response_body_only(data, False, True) is None  # its context left to protobuf
        assert response_body_only(data, True) is None
        bare = data[:-2]
        odd = [
            b"\x50\x01" + bare,  # the flag first
            bare + b"\x50\x81\x00",  # a non-minimal varint
            bare + b"\x50\x02",  # another true value
            bare + b"\x50\x00",  # false
            bare + b"\x50\x01\x50\x01",  # repeated
            bare + b"\x50\x01\x42\x00",  # a context after it
            bare[:-1] + b"\x50\x01",  # the context cut
        ]
        for o in odd:
            assert response_body_only(o, True, True) is None, o


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
        if rnd.random() < 0.3:  # the flag as Envoy encodes it, or an odd encoding of it
            data += rnd.choice([b"\x50\x01", b"\x50\x01", b"\x50\x81\x00", b"\x50\x02", b"\x50\x00", b"\x50\x01\x50\x01"])
        observed = rnd.random() < 0.5
        got = response_body_only(bytes(data), False, observed)
        if got is not None:
            assert got == _only_body(bytes(data), False, observed), bytes(data)
        got = response_body_only(bytes(data), True, observed)
        if got is not None:
            try:
                pb.ProcessingRequest.FromString(bytes(data))
            except Exception:  # the context's content is not read: what comes before it is a chunk
                cut = data[:-2] if observed else data
                assert data.endswith(b"\x50\x01") or not observed
                assert any(response_body_only(bytes(cut[:k])) == got for k in range(len(cut))), bytes(data)
            else:
                assert got == _only_body(bytes(data), True, observed), bytes(data)
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
    observing = False  # the server's ``_Exchange.one_observed`` takes the stream's messages
    for m in messages:
        data = m.SerializeToString()
        # as ``_Exchange.one``, then ``one_observed`` (the flag read too; the reply dropped)
        chunk = response_body_only(data, s.call.forwarded is not None, observing) if from_bytes else None
        if chunk is not None:
            shortcuts += 1
            reply = s.handle_body_chunk(chunk)
            replies.append(_reply(None if observing else reply))
        else:
            reply = s.handle(pb.ProcessingRequest.FromString(data))
            replies.append(_reply(reply))
            observing = observing or (reply is None and s.observe_only)
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
    response), in observability mode (its chunks read with the flag once its first message got
    no reply, as the server reads them), with an end of stream, Content-Length or an encoding."""
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
    if rnd.random() < 0.4:
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
        1 for m in messages if m.HasField("response_body") and m.response_body.body and not m.response_body.end_of_stream
    )  # (in observability mode too: the stream's first message, never a chunk, puts it in that mode)
    if context < 0.3 or context >= 0.5:  # a context on every message, or on none: every chunk read from its bytes
        assert shortcuts == eligible
