"""Cohere v2: ``/v2/chat`` (JSON or SSE), ``/v2/rerank`` and ``/v2/embed`` (also their v1 paths
for rerank and embed, which share the ``meta`` shape).

Cohere reports two sets of counts: ``tokens`` (what the model processed) and ``billed_units``
(what is billed). Usage is ``tokens`` {input_tokens, output_tokens}; ``billed_units`` goes to
``obs.extra["billed_units"]``. When a response carries no ``tokens`` (embed often does not),
billed ``input_tokens``/``output_tokens`` are used as usage instead. Responses do not name the
model, so ``response_model`` stays unset. Streamed chat is SSE; only ``message-end`` (whose
``delta`` has ``finish_reason`` and ``usage``) is parsed, plus text deltas when capturing.

Cohere v1 chat (``/v1/chat``) answers with one JSON object, or with ``stream: true`` newline-
delimited JSON events (``application/stream+json``) whose ``stream-end`` event carries the whole
response, ``meta`` included.
"""

from __future__ import annotations

from typing import Any

from extproc.apis.base import NDJSON, ApiParser, dig, items
from extproc.apis.finish import CONTENT_FILTER, ERROR, LENGTH, STOP, TOOL_CALLS
from extproc.apis.routing import Provider, route


class _CohereUsage(ApiParser):
    default_provider = "cohere"

    def cohere_usage(self, usage: Any) -> None:
        """``usage`` (chat) or ``meta`` (rerank, embed): ``tokens`` + ``billed_units``."""
        if not isinstance(usage, dict):
            return
        billed = usage.get("billed_units")
        if isinstance(billed, dict):
            self.obs.extra["billed_units"] = billed
        tokens = usage.get("tokens")
        if not isinstance(tokens, dict):
            tokens = billed
        if isinstance(tokens, dict):
            self.set_usage(input_tokens=tokens.get("input_tokens"), output_tokens=tokens.get("output_tokens"))

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        rid = obj.get("id")
        if isinstance(rid, str) and rid:
            self.obs.response_id = rid
        self.cohere_response(obj)

    def cohere_response(self, obj: dict[str, Any]) -> None:
        self.cohere_usage(obj.get("meta"))

    def finish(self, reason: Any) -> None:
        if isinstance(reason, str) and reason:
            self.obs.finish_reasons.append(reason)

    def on_error_json(self, obj: Any) -> None:
        super().on_error_json(obj)
        if self.obs.error_type is None and isinstance(obj, dict) and isinstance(obj.get("message"), str):
            self.obs.error_type = "error"  # Cohere errors are {"message": ...}: no type given


class CohereChat(_CohereUsage):
    """A stream is complete at ``message-end``."""

    stream_markers = True
    operation = "chat"
    api = "cohere.chat"
    param_keys = ("temperature", "p", "k", "max_tokens", "seed", "stop_sequences")
    input_keys = ("messages",)

    def cohere_response(self, obj: dict[str, Any]) -> None:
        self.finish(obj.get("finish_reason"))
        self.cohere_usage(obj.get("usage"))
        if self.capture:
            for part in items(dig(obj, "message", "content")):
                if isinstance(part, dict):
                    self.capture_text(part.get("text"))

    def want_sse_event(self, event: bytes, data: bytes) -> bool:
        if self.capture:
            return True
        if event:
            return event == b"message-end"
        return data.find(b'"message-end"', 0, 64) >= 0

    def on_sse_event(self, event: bytes, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "message-end":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self.finish(delta.get("finish_reason"))
                self.cohere_usage(delta.get("usage"))
            self.mark_complete()
        elif kind == "message-start":
            rid = obj.get("id")
            if isinstance(rid, str) and rid:
                self.obs.response_id = rid
        elif kind == "content-delta":
            self.capture_text(dig(obj, "delta", "message", "content", "text"))


class CohereChatV1(_CohereUsage):
    """A stream is complete at ``stream-end``."""

    stream_markers = True
    operation = "chat"
    api = "cohere.chat.v1"
    param_keys = CohereChat.param_keys
    input_keys = ("message",)

    def framing_for(self, status: int, content_type: str) -> str:
        if status < 400 and content_type.startswith("application/stream+json"):
            return NDJSON
        return super().framing_for(status, content_type)

    def want_json_line(self, line: bytes) -> bool:
        return self.capture or line.find(b'"stream-end"') >= 0

    def cohere_response(self, obj: dict[str, Any]) -> None:
        kind = obj.get("event_type")
        if kind == "text-generation":
            self.capture_text(obj.get("text"))
            return
        if kind == "stream-end":
            self.mark_complete()
            response = obj.get("response")
            if not isinstance(response, dict):
                return
            obj = response
        elif kind is not None:  # stream-start, tool events, citations...
            return
        rid = obj.get("response_id") or obj.get("generation_id")
        if isinstance(rid, str) and self.obs.response_id is None:
            self.obs.response_id = rid
        self.finish(obj.get("finish_reason"))
        self.cohere_usage(obj.get("meta"))
        if kind is None:  # a streamed text was captured delta by delta
            self.capture_text(obj.get("text"))


class CohereRerank(_CohereUsage):
    """Rerank has no OpenTelemetry GenAI operation name; we use ``rerank``."""

    operation = "rerank"
    api = "cohere.rerank"
    param_keys = ("top_n",)


class CohereEmbed(_CohereUsage):
    operation = "embeddings"
    api = "cohere.embed"
    param_keys = ("input_type", "embedding_types", "output_dimension")
    input_keys = ("texts", "inputs")


ORDER = 50
PROVIDERS = (
    Provider(
        "cohere",
        "cohere",
        ("api.cohere.com", "api.cohere.ai"),
        catalogue=("cohere",),
        openinference=("cohere", "cohere"),
        model_markers=("cohere.",),
    ),
)
# finish_reason (v2 upper case, v1 upper case too)
FINISH_REASONS = {
    "COMPLETE": STOP,
    "STOP_SEQUENCE": STOP,
    "MAX_TOKENS": LENGTH,
    "TOOL_CALL": TOOL_CALLS,
    "ERROR": ERROR,
    "ERROR_TOXIC": CONTENT_FILTER,
    "ERROR_LIMIT": LENGTH,
}
ROUTES = [
    route(r"^/v2/chat$", CohereChat, "cohere"),
    route(r"^/v1/chat$", CohereChatV1, "cohere"),
    route(r"^/v[12]/rerank$", CohereRerank, "cohere"),
    route(r"^/v[12]/embed$", CohereEmbed, "cohere"),
]
