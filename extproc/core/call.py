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
    priced: bool = False  # an LLM call that consumes tokens (its parser's ``priced``): budgets charge it
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
    completed: float | None = None  # perf_counter() when the response was complete (end marker / last byte)
    processing: float = 0.0  # seconds inside the sidecar's message handlers (the self-cost metric), waits excluded
    # Attribution (extproc.core.attribution), each cut to 128 characters; None: not known.
    session_id: str | None = None
    key_id: str | None = None
    end_user_header: str | None = None  # attribution.endUserHeader's value; wins over the body's

    @property
    def end_user(self) -> str | None:
        """Who the call was made for: the configured header, else the request body's field."""
        return self.end_user_header or self.obs.end_user

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def ttft(self) -> float | None:
        return None if self.first_chunk is None else self.first_chunk - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (last byte - first chunk) / (output - 1),
        once the response is complete (else at the stream's end). Metadata and the histogram
        both read this, so the access log and the metrics agree."""
        n = self.obs.usage.output_tokens
        end = self.completed if self.completed is not None else self.end
        if self.first_chunk is None or end is None or n is None or n <= 1:
            return None
        return max(end - self.first_chunk, 0.0) / (n - 1)


class CallObserver(Protocol):
    """Metrics, tracing, logging: told once per call, when it ends. Must not raise.

    An observer may also define ``on_stream_start()`` (no arguments, must not raise): called when
    a stream opens, before any message (the in-flight gauge)."""

    def on_call_end(self, call: Call) -> None: ...
