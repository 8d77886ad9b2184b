"""The parser of a stream whose body is not observed: every method does nothing.

A path the router does not know (not an LLM API: its status is all we record), a stream not
routed yet (Envoy's own 401 arrives as a response with no request phase), and a stream whose
parsing was abandoned (a budget, a decoding error, a bug on a payload) all have this parser, so
the stream code calls its parser without asking whether there is one. ``observed`` is False: the
servicer then skips the request body, completes the call with the response headers, and settles
it by the HTTP response alone. Stateless: one instance serves every stream.
"""

from __future__ import annotations


class PassThrough:
    __slots__ = ()

    observed = False  # ApiParser.observed is True
    priced = False
    complete = False  # no end marker to see: the HTTP response's end settles the call
    stream_error = False

    def feed_request(self, body: bytes, complete: bool = True) -> None:
        pass

    def start_response(self, status: int, content_type: str) -> None:
        pass

    def feed_response(self, chunk: bytes, end: bool) -> bool:
        return False

    def work_items(self, chunk: bytes) -> int:
        return 0

    def held_bytes(self) -> int:
        return 0


PASS_THROUGH = PassThrough()
