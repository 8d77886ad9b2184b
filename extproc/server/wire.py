"""The ext_proc message Envoy sends for each streamed chunk after the first, read from its bytes.

Per streamed chunk Envoy sends a ``ProcessingRequest`` holding a ``response_body`` with its
``body`` (no end of stream) and, when its ext_proc filter forwards metadata namespaces
(``metadata_options.forwarding_namespaces``: the generated config forwards jwt_authn's), a
``metadata_context`` after it, on every message, empty when there is nothing to forward. That is
two length-delimited fields, one inside the other, and perhaps a third after them. In
observability mode (``observability_mode`` in the filter's config) Envoy sets the message's
``observability_mode`` last (``Filter::sendDataInObservabilityMode``: the chunk's message is built,
then the flag set) and serialises fields in their numbers' order, so the flag (field 10, a varint)
comes after the body (5) and the context (8): the two bytes ``50 01`` end every such message.
:func:`response_body_only` recognises exactly that shape and returns the body (a slice of the
message's bytes), so the servicer handles the chunk without building the protobuf message, its
``HttpBody`` wrapper and the body's copy, or asking it which field is set; any other message (or
an unusual encoding: a length over two varint bytes, a repeated or unknown field, the flag
encoded otherwise or elsewhere) returns None and is parsed as usual. ``tests/unit/test_wire.py``
checks it against protobuf's own parse.
"""

from __future__ import annotations

from extproc._pb.envoy_api import external_processor_pb2 as pb


def _tag(field: int) -> int:
    """The one-byte key of a length-delimited field (wire type 2)."""
    key = (field << 3) | 2
    assert key < 0x80, "a one-byte key"
    return key


_RESPONSE_BODY = _tag(pb.ProcessingRequest.DESCRIPTOR.fields_by_name["response_body"].number)
_BODY = _tag(pb.HttpBody.DESCRIPTOR.fields_by_name["body"].number)
_CONTEXT = _tag(pb.ProcessingRequest.DESCRIPTOR.fields_by_name["metadata_context"].number)
# The one-byte key of ``observability_mode`` (a varint, wire type 0); Envoy's value is 1 (true)
_OBSERVED = pb.ProcessingRequest.DESCRIPTOR.fields_by_name["observability_mode"].number << 3
assert _OBSERVED < 0x80, "a one-byte key"


def response_body_only(data: bytes, context: bool = False, observed: bool = False) -> bytes | None:
    """The body of a serialised ``ProcessingRequest`` that holds a ``response_body`` with a
    non-empty ``body`` and nothing else (each length in one or two varint bytes); None for any
    other message. With ``context``, also of such a message followed by a ``metadata_context``
    (Envoy's, forwarding metadata namespaces), whose content is not read: the caller passes it
    once the stream's call holds what an earlier message forwarded (``Stream.handle`` reads a
    ``metadata_context`` only until then), and it is no longer needed. With ``observed``, of
    such a message (with ``context``, perhaps with its context) followed by
    ``observability_mode`` set as Envoy encodes it (``50 01``, the message's last two bytes) and
    only of such a message: the caller passes it on a stream in observability mode, whose
    messages all carry it."""
    n = len(data)
    if observed:  # the flag ends the message: what comes before it is read as without it
        if n < 6 or data[n - 1] != 1 or data[n - 2] != _OBSERVED:
            return None
        n -= 2
    if n < 4 or data[0] != _RESPONSE_BODY:
        return None
    size = data[1]
    p = 2
    if size & 0x80:
        high = data[2]
        if high & 0x80:
            return None
        size = (size & 0x7F) | (high << 7)
        p = 3
    end = p + size  # the response body's end
    if end != n:  # only a metadata context may follow, and only with ``context``
        if not context or end + 2 > n or data[end] != _CONTEXT:
            return None
        length = data[end + 1]
        e = end + 2
        if length & 0x80:
            if e >= n:
                return None
            high = data[e]
            if high & 0x80:
                return None
            length = (length & 0x7F) | (high << 7)
            e += 1
        if e + length != n:
            return None
    if size < 2 or data[p] != _BODY:
        return None
    size = data[p + 1]
    q = p + 2
    if size & 0x80:
        if q >= end:
            return None
        high = data[q]
        if high & 0x80:
            return None
        size = (size & 0x7F) | (high << 7)
        q += 1
    if q + size != end:
        return None
    return data[q:end]
