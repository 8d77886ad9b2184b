"""The few fields of an HTTP exchange the servicer reads, from headers or, in fewer-messages mode
(docs/performance.md), from the attributes Envoy attaches to the first message of each direction.

Values come from the client or the upstream: a number that is not a plain ASCII integer of sane
length is ignored (``str.isdigit`` accepts "²" and other digits ``int()`` refuses).
"""

from __future__ import annotations

from typing import Any

from extproc.core.call import Call


def content_length(value: str) -> int | None:
    """A Content-Length header's value, or None if it is not a plain integer."""
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


def status_code(value: str) -> int:
    """An HTTP status (``:status``, ``response.code``), or 0 if it is not one."""
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 3 else 0


def read_request_attributes(attrs: Any, call: Call) -> None:
    """``request.path``, ``.host``, ``.method`` and ``request.headers["name"]`` into ``call``."""
    headers = call.headers
    for key, v in attrs.fields.items():
        value = _text(v)
        if key == "request.path":
            call.path = value
        elif key == "request.host":
            call.host = value
        elif key == "request.method":
            call.method = value
        elif key.startswith('request.headers["') and key.endswith('"]') and value:
            headers[key[17:-2].lower()] = value


def read_response_attributes(attrs: Any) -> tuple[str, str, str, int | None]:
    """``response.code``, and the content type, encoding and length (copied into metadata by
    Envoy's header_to_metadata filter): (status, content type, encoding, length)."""
    status = content_type = encoding = ""
    length = None
    for key, v in attrs.fields.items():
        if key == "response.code":
            status = _text(v)
        elif key.endswith('["content-type"]'):
            content_type = _text(v)
        elif key.endswith('["content-encoding"]'):
            encoding = _text(v)
        elif key.endswith('["content-length"]'):
            length = content_length(_text(v))
    return status, content_type, encoding, length


def _text(v: Any) -> str:
    """An attribute's value as text: strings as they are, numbers (``response.code``) as integers."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return str(v.string_value)
    if kind == "number_value":
        return str(int(v.number_value))
    return ""
