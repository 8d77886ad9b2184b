"""Drive one ext_proc stream through a Processor as the gRPC server does (no server, no Envoy):
``open_stream``, ``handle`` per message until the messages end or the stream says it is over,
then ``close_stream`` exactly once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.server.processor import Processor


def drive(processor: Processor, messages: Iterable[pb.ProcessingRequest], metadata: Mapping[str, Any] | None = None) -> list[bytes]:
    """The replies (serialised) to ``messages``, sent on one stream with gRPC ``metadata``.

    The stream is closed when ``messages`` run out, whether or not they reached the response's
    end: that is also what a reset by Envoy (a client that hung up) amounts to. ``messages`` is
    read one at a time, between replies (a generator may sleep to space them out)."""
    stream = processor.open_stream(metadata)
    replies = []
    try:
        for req in messages:
            reply = stream.handle(req)
            if reply is not None:
                replies.append(reply)
            if stream.end_stream:
                break
    finally:
        processor.close_stream(stream)
    return replies
