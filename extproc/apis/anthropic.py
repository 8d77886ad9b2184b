"""Anthropic Messages API (``/v1/messages``) and its token counter (``/v1/messages/count_tokens``).

Token semantics (declared on :class:`AnthropicEvents`): Anthropic's ``input_tokens`` EXCLUDES
prompt tokens read from or written to the prompt cache, which it reports separately
(``cache_read_input_tokens`` -> cached_input, ``cache_creation_input_tokens`` ->
cache_creation_input). The normalised input is their sum: every prompt token the model
processed, the same meaning as OpenAI's ``prompt_tokens``. Output includes thinking.

Streaming: ``message_start`` carries the first usage (input, cache, a small output count) and
``message_delta`` the cumulative usage so far; each overwrites the fields it carries, so the final
value wins (the normalised input is recomputed from the latest pieces, never added twice). Some Anthropic-compatible servers report input and cache usage only on
``message_delta``; that works the same way.

The ``output_tokens`` of ``message_start`` is a placeholder (1 to a few tokens, before any text
was generated), not a count of what the stream produced: it is held back, and used only if the
stream completes without a ``message_delta`` output count. So a stream the client abandons
before ``message_delta`` reports its input and cache tokens (real, and billed) and no output
count. A stream is complete at ``message_stop``, or at a ``message_delta`` with a
``stop_reason`` (the final usage; only ``message_stop`` follows); an ``error`` event ends it as an
error.

The event handling lives in :class:`AnthropicEvents` so Bedrock InvokeModel and Vertex AI
``rawPredict`` (same payloads, other transports) reuse it.
"""

from __future__ import annotations

import re
from typing import Any

from extproc.apis.base import ApiParser, items
from extproc.apis.finish import CONTENT_FILTER, LENGTH, STOP, TOOL_CALLS
from extproc.apis.routing import Provider, route

# Events that can carry usage, the model or a finish/error; everything else is text deltas.
_USEFUL_EVENTS = frozenset((b"message_start", b"message_delta", b"message_stop", b"error"))
_USEFUL_TYPES = (b'"message_start"', b'"message_delta"', b'"message_stop"', b'"error"')
_USEFUL_TYPE = re.compile(b"|".join(re.escape(t) for t in _USEFUL_TYPES)).search


class AnthropicEvents(ApiParser):
    """Anthropic message bodies and stream events, whatever transport carries them.

    Token semantics: ``input_tokens`` EXCLUDES cache reads (``cache_read_input_tokens``) and
    writes (``cache_creation_input_tokens``); the normalised input adds them. Output includes
    thinking. No total is reported (input + output)."""

    operation = "chat"
    api = "anthropic.messages"
    default_provider = "anthropic"
    param_keys = ("max_tokens", "temperature", "top_p", "top_k", "stop_sequences")
    input_keys = ("messages",)
    system_keys = ("system",)
    end_user_keys = (("metadata", "user_id"),)
    stream_markers = True
    input_excludes_cache = True
    _start_output: Any = None  # message_start's placeholder output_tokens (see module doc)

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        if obj.get("type") == "error":
            self.on_error_json(obj)
            return
        self.anthropic_message(obj, streamed=False)

    def want_anthropic_event(self, data: bytes) -> bool:
        """Cheap test on a raw event payload (no event name): may it hold what we read?"""
        if self.capture:
            return True
        # "type" comes first in Anthropic's events: one scan of the first 64 bytes
        return _USEFUL_TYPE(data, 0, 64) is not None or data.find(b'"usage"') >= 0

    def anthropic_event(self, obj: Any) -> None:
        """One parsed stream event (``{"type": "message_start", ...}``)."""
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self.anthropic_message(message, streamed=True)
        elif kind == "message_delta":
            delta = obj.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            self._finish(stop)
            self._usage(obj.get("usage"))
            if isinstance(stop, str) and stop:
                self._stream_complete()
        elif kind == "message_stop":
            self._stream_complete()
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self.capture_text(delta.get("text"))
        elif kind == "error":
            self.on_error_json(obj)
            self.mark_complete(error=True)

    def _stream_complete(self) -> None:
        if self.reported.output_tokens is None and self._start_output is not None:
            self.set_usage(output_tokens=self._start_output)  # no message_delta count came
        self.mark_complete()

    def anthropic_message(self, obj: dict[str, Any], streamed: bool) -> None:
        self.set_response_model(obj.get("model"))
        rid = obj.get("id")
        if isinstance(rid, str) and rid and self.obs.response_id is None:
            self.obs.response_id = rid
        self._finish(obj.get("stop_reason"))
        usage = obj.get("usage")
        if streamed and isinstance(usage, dict) and "output_tokens" in usage:
            self._start_output = usage["output_tokens"]
            usage = {k: v for k, v in usage.items() if k != "output_tokens"}
        self._usage(usage)
        if self.capture and not streamed:
            for block in items(obj.get("content")):
                if isinstance(block, dict) and block.get("type") == "text":
                    self.capture_text(block.get("text"))

    def _finish(self, reason: Any) -> None:
        if isinstance(reason, str) and reason:
            self.obs.finish_reasons.append(reason)

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.set_usage(
                input_tokens=usage.get("input_tokens"),
                output_tokens=usage.get("output_tokens"),
                cached_input_tokens=usage.get("cache_read_input_tokens"),
                cache_creation_input_tokens=usage.get("cache_creation_input_tokens"),
            )


class AnthropicMessages(AnthropicEvents):
    """``POST /v1/messages``: one JSON message, or SSE events when ``stream`` is true."""

    def want_sse_event(self, event: bytes, data: bytes) -> bool:
        if self.capture:
            return True
        if event:
            return event in _USEFUL_EVENTS
        return self.want_anthropic_event(data)

    def on_sse_event(self, event: bytes, obj: Any) -> None:
        self.anthropic_event(obj)


class VertexAnthropic(AnthropicMessages):
    """Claude on Vertex AI (``publishers/anthropic/models/{m}:rawPredict|streamRawPredict``).

    Same bodies as Anthropic's API; the request has no ``model`` (it is in the path).
    """

    api = "vertex.anthropic"
    default_provider = "vertex_ai"


class AnthropicCountTokens(ApiParser):
    """``POST /v1/messages/count_tokens`` -> ``{"input_tokens": N}``.

    Operation ``count_tokens`` (not an OpenTelemetry GenAI well-known name: there is none for it).
    Counting consumes no tokens, so the count is NOT recorded as usage (it would inflate token
    metrics); it goes to ``obs.extra["counted_input_tokens"]``.
    """

    priced = False

    operation = "count_tokens"
    api = "anthropic.count_tokens"
    default_provider = "anthropic"
    count_key = "input_tokens"

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        raw = obj.get(self.count_key)
        if raw is None:
            return
        if type(raw) is int and raw >= 0:
            self.obs.extra["counted_input_tokens"] = raw
        else:
            self.obs.parse_error("bad_token_count")


ORDER = 40
PROVIDERS = (
    Provider(
        "anthropic",
        "anthropic",
        ("api.anthropic.com",),
        catalogue=("anthropic",),
        openinference=("anthropic", "anthropic"),
        model_markers=("claude", "anthropic."),
    ),
)
# stop_reason (also Claude through Bedrock and Vertex AI)
FINISH_REASONS = {
    "end_turn": STOP,
    "stop_sequence": STOP,
    "max_tokens": LENGTH,
    "tool_use": TOOL_CALLS,
    "refusal": CONTENT_FILTER,
    "model_context_window_exceeded": LENGTH,
}
ROUTES = [
    route(r"/v1/messages/count_tokens$", AnthropicCountTokens),
    route(r"/v1/messages$", AnthropicMessages),
]
