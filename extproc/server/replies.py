"""The servicer's replies to Envoy, serialised once at import: a reply is one of these bytes, or
one of them with the call's dynamic metadata appended (``metadata.encoded``)."""

from __future__ import annotations

from typing import Any

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc._pb.envoy_api import processing_mode_pb2 as mode_pb

Mode = mode_pb.ProcessingMode


def _reply(**kw: Any) -> bytes:
    msg = pb.ProcessingResponse()
    for name in kw:
        getattr(msg, name).SetInParent()
    return msg.SerializeToString()


CONTINUE_REQUEST_HEADERS = _reply(request_headers=True)
CONTINUE_RESPONSE_HEADERS = _reply(response_headers=True)
CONTINUE_REQUEST_BODY = _reply(request_body=True)
CONTINUE_RESPONSE_BODY = _reply(response_body=True)
CONTINUE_REQUEST_TRAILERS = _reply(request_trailers=True)
CONTINUE_RESPONSE_TRAILERS = _reply(response_trailers=True)
# An unrecognised path: skip its request body (the response headers still come, for the status).
SKIP_REQUEST_BODY = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(), mode_override=Mode(request_body_mode=Mode.NONE)
).SerializeToString()
# Response-headers replies choosing the response body mode; the metadata is appended to them.
HEADERS_STREAMED = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse(), mode_override=Mode(response_body_mode=Mode.STREAMED)
).SerializeToString()
HEADERS_NO_BODY = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse(), mode_override=Mode(response_body_mode=Mode.NONE)
).SerializeToString()

# The reply to a message of each kind when there is nothing to hand over.
CONTINUE = {
    "request_headers": CONTINUE_REQUEST_HEADERS,
    "response_headers": CONTINUE_RESPONSE_HEADERS,
    "request_body": CONTINUE_REQUEST_BODY,
    "response_body": CONTINUE_RESPONSE_BODY,
    "request_trailers": CONTINUE_REQUEST_TRAILERS,
    "response_trailers": CONTINUE_RESPONSE_TRAILERS,
}
