"""One HTTP exchange through Envoy as the sidecar saw it: the record observers read at its end."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from extproc.core.observation import Observation
from extproc.core.pricing import Cost, Unpriced

# Outcomes, one per call. "Complete" is a protocol fact: a non-streamed body fully received, or a
# stream's end marker ([DONE], message_stop, finishReason, ...; see extproc.apis.base).
OK = "ok"  # the response is complete, status < 400
ERROR = "error"  # status >= 400, an in-stream error event, or a stream the upstream ended before its marker
CLIENT_ABORT = "client_abort"  # the exchange ended before the response was complete (client or upstream hung up)
NO_RESPONSE = "no_response"  # the stream ended before any response headers

# error_type of a stream the upstream closed cleanly before the API's end marker
INCOMPLETE_STREAM = "incomplete_stream"


@dataclass(slots=True, eq=False)
class Call:
    obs: Observation = field(default_factory=Observation)
    provider: str = "unknown"
    api: str = "unknown"  # parser's schema name, "unknown" when the path matched none
    method: str = ""
    path: str = ""
    host: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # request headers, lower-case keys
    forwarded: Any = None  # metadata_context.filter_metadata Envoy forwarded (jwt_authn claims)
    trace_context: dict[str, str] = field(default_factory=dict)  # traceparent Envoy's tracing put on the gRPC stream
    status: int = 0
    outcome: str = ""
    start_time_ns: int = 0  # wall clock, for spans
    start: float = 0.0  # perf_counter() at the first message
    response_start: float | None = None  # response headers seen
    first_chunk: float | None = None  # first response body chunk seen
    end: float | None = None
    response_bytes: int = 0  # raw (still encoded) response body bytes observed
    decode_error: str | None = None  # Content-Encoding trouble (bomb, corrupt, unsupported)
    request_complete: bool = True  # False when Envoy sent only a prefix of a large request body
    cost: Cost | Unpriced | None = None  # priced when usage is seen and at the end (None: not an LLM call to price)

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def ttft(self) -> float | None:
        return None if self.first_chunk is None else self.first_chunk - self.start


class CallObserver(Protocol):
    """Metrics, tracing, logging: told once per call, when it ends. Must not raise.

    An observer may also define ``on_stream_start()`` (no arguments, must not raise): called when
    a stream opens, before any message (the in-flight gauge)."""

    def on_call_end(self, call: Call) -> None: ...
