"""AWS Bedrock runtime: Converse / ConverseStream and InvokeModel / InvokeModelWithResponseStream.

The model id is in the path (``/model/{modelId}/converse``), URL-decoded by the router (ids like
``anthropic.claude-3-5-sonnet-20240620-v1%3A0`` or an inference-profile ARN). Bedrock's bodies do
not name the model, so ``response_model`` stays unset.

Streams are binary ``application/vnd.amazon.eventstream`` frames (see ``extproc.codecs.eventstream``):

- ConverseStream: the ``metadata`` event carries ``usage`` (inputTokens, outputTokens,
  totalTokens, cacheReadInputTokens -> cached_input, cacheWriteInputTokens -> cache_creation).
  As with Anthropic, every Bedrock API's input count EXCLUDES cache reads and writes: the
  normalised input adds them (``input_excludes_cache``); totalTokens already includes them.
- InvokeModelWithResponseStream: ``chunk`` events whose JSON ``{"bytes": "<base64>"}`` holds the
  model's own stream event: Anthropic events for Claude, Converse-shaped ones (``metadata.usage``)
  for Nova. The last chunk may add ``amazon-bedrock-invocationMetrics`` (inputTokenCount,
  outputTokenCount, ...): used only for the counts the model's own payload did not give.

An ``exception`` message records ``:exception-type`` as the error type and ends the stream as an
error. Completion: ConverseStream is complete once both ``messageStop`` and ``metadata`` (the
usage, sent last) arrived; InvokeModelWithResponseStream at the model's own end marker (Claude's
``message_stop``/``message_delta`` with ``stop_reason``, Nova's ``messageStop`` + ``metadata``) or
at the chunk carrying ``amazon-bedrock-invocationMetrics``, which Bedrock adds to the last one.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from extproc.apis.anthropic import AnthropicEvents
from extproc.apis.base import NONE, ApiParser, dig, items
from extproc.apis.finish import CONTENT_FILTER, LENGTH, STOP, TOOL_CALLS
from extproc.apis.routing import Provider, route
from extproc.codecs.eventstream import EventStreamDecoder, Message

EVENTSTREAM = "application/vnd.amazon.eventstream"

_INFERENCE_PARAMS = {
    "maxTokens": "max_tokens",
    "temperature": "temperature",
    "topP": "top_p",
    "stopSequences": "stop",
}


class _EventStreamParser(ApiParser):
    """Adds the AWS eventstream framing; subclasses implement ``on_stream_message``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._events: EventStreamDecoder | None = None
        self._bad_frames = 0

    def framing_for(self, status: int, content_type: str) -> str:
        if status < 400 and content_type.startswith(EVENTSTREAM):
            return NONE
        return super().framing_for(status, content_type)

    def start_response(self, status: int, content_type: str) -> None:
        super().start_response(status, content_type)
        if self._framing == NONE:
            self.obs.streaming = True
            self._stream = self._events = EventStreamDecoder(max(self.limits.max_event_bytes, 1 << 20))

    def feed_other(self, chunk: bytes, end: bool) -> None:
        events = self._events
        if events is None:
            return
        failed = events.failed
        for message in events.decode(chunk):
            if message.headers.get(":message-type", "event") == "event":
                self.on_stream_message(message.headers.get(":event-type", ""), message)
            else:
                self._exception(message)
        while self._bad_frames < events.bad_frames:
            self._bad_frames += 1
            self.obs.parse_error("eventstream_crc")
        if events.failed is not None and failed is None:
            self.obs.parse_error("eventstream_" + events.failed)
        if end and events.held:
            self.obs.parse_error("eventstream_truncated")

    def on_stream_message(self, event_type: str, message: Message) -> None:
        """One ``:message-type: event`` frame."""

    def stream_json(self, payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.obs.parse_error("eventstream_json")
            return None

    def _exception(self, message: Message) -> None:
        kind = message.headers.get(":exception-type") or message.headers.get(":error-code")
        self.obs.error_type = (kind or "exception")[:64]
        self.mark_complete(error=True)


class BedrockConverse(_EventStreamParser):
    """``/model/{id}/converse`` (JSON) and ``/model/{id}/converse-stream`` (eventstream)."""

    operation = "chat"
    api = "bedrock.converse"
    default_provider = "bedrock"
    input_excludes_cache = True  # inputTokens leaves out cacheReadInputTokens and cacheWriteInputTokens
    input_keys = ("messages",)
    system_keys = ("system",)
    stream_markers = True
    _stopped = False  # messageStop seen
    _metadata = False  # metadata (usage) seen

    def on_request_json(self, obj: dict[str, Any]) -> None:
        config = obj.get("inferenceConfig")
        if isinstance(config, dict):
            for key, name in _INFERENCE_PARAMS.items():
                value = config.get(key)
                if value is not None:
                    self.obs.params[name] = value

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        self._stop(obj.get("stopReason"))
        self.converse_usage(obj.get("usage"))
        if self.capture:
            for block in items(dig(obj, "output", "message", "content")):
                if isinstance(block, dict):
                    self.capture_text(block.get("text"))

    def on_stream_message(self, event_type: str, message: Message) -> None:
        if event_type == "metadata":
            obj = self.stream_json(message.payload)
            if isinstance(obj, dict):
                self.converse_usage(obj.get("usage"))
            self._metadata = True
            if self._stopped:
                self.mark_complete()
        elif event_type == "messageStop":
            obj = self.stream_json(message.payload)
            if isinstance(obj, dict):
                self._stop(obj.get("stopReason"))
            self._stopped = True
            if self._metadata:
                self.mark_complete()
        elif event_type == "contentBlockDelta" and self.capture:
            obj = self.stream_json(message.payload)
            delta = obj.get("delta") if isinstance(obj, dict) else None
            if isinstance(delta, dict):
                self.capture_text(delta.get("text"))

    def _stop(self, reason: Any) -> None:
        if isinstance(reason, str) and reason:
            self.obs.finish_reasons.append(reason)

    def converse_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.set_usage(**_converse_counts(usage))


class BedrockInvoke(_EventStreamParser, AnthropicEvents):
    """``/model/{id}/invoke`` and ``/model/{id}/invoke-with-response-stream``.

    The body is the model's native schema. Read: Anthropic Messages (Claude), Converse-shaped
    ``usage``/``metadata.usage`` (Nova), Llama's ``prompt_token_count``/``generation_token_count``,
    and the ``amazon-bedrock-invocationMetrics`` Bedrock appends to a stream's last chunk.
    """

    operation = "chat"
    api = "bedrock.invoke"
    default_provider = "bedrock"
    # Claude's input_tokens, Nova's inputTokens and invocationMetrics' inputTokenCount all leave out
    # cache reads and writes (Llama reports no cache)
    input_excludes_cache = True
    stream_markers = True
    _stopped = False  # Nova: messageStop seen
    _metadata = False  # Nova: metadata (usage) seen

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        self._native(obj, streamed=False)

    def on_stream_message(self, event_type: str, message: Message) -> None:
        if event_type != "chunk":
            return
        outer = self.stream_json(message.payload)
        raw = outer.get("bytes") if isinstance(outer, dict) else None
        if not isinstance(raw, str):
            self.obs.parse_error("invoke_chunk")
            return
        try:
            inner = base64.b64decode(raw, validate=True)
        except binascii.Error:
            self.obs.parse_error("invoke_chunk_base64")
            return
        if not self._want_inner(inner):
            return
        obj = self.stream_json(inner)
        if isinstance(obj, dict):
            self._native(obj, streamed=True)

    def _want_inner(self, inner: bytes) -> bool:
        return (
            self.want_anthropic_event(inner)
            or inner.find(b"invocationMetrics") >= 0
            or inner.find(b'"metadata"') >= 0
            or inner.find(b'"messageStop"') >= 0
        )

    def _native(self, obj: dict[str, Any], streamed: bool) -> None:
        kind = obj.get("type")
        if isinstance(kind, str):  # Anthropic: a stream event, or a whole message
            if kind == "message" and not streamed:
                self.anthropic_message(obj, streamed=False)
            elif kind == "error":
                self.on_error_json(obj)
            else:
                self.anthropic_event(obj)
        else:
            self._other_models(obj)
        metrics = obj.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, dict):
            self._fallback(metrics)
            if streamed:
                self.mark_complete()  # Bedrock adds it to the stream's last chunk

    def _other_models(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        metadata = obj.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("usage"), dict):
            usage = metadata["usage"]
            self._metadata = True
        if isinstance(usage, dict):
            self.set_usage(**_converse_counts(usage))
        stop = obj.get("stopReason") or obj.get("stop_reason")
        message_stop = obj.get("messageStop")
        if isinstance(message_stop, dict):
            stop = message_stop.get("stopReason")
            self._stopped = True
        if isinstance(stop, str) and stop:
            self.obs.finish_reasons.append(stop)
        if self._stopped and self._metadata:
            self.mark_complete()
        if "prompt_token_count" in obj or "generation_token_count" in obj:  # Llama
            self.set_usage(
                input_tokens=obj.get("prompt_token_count"),
                output_tokens=obj.get("generation_token_count"),
            )

    def _fallback(self, metrics: dict[str, Any]) -> None:
        usage = self.reported
        self.set_usage(
            input_tokens=metrics.get("inputTokenCount") if usage.input_tokens is None else None,
            output_tokens=metrics.get("outputTokenCount") if usage.output_tokens is None else None,
            cached_input_tokens=(metrics.get("cacheReadInputTokenCount") if usage.cached_input_tokens is None else None),
            cache_creation_input_tokens=(metrics.get("cacheWriteInputTokenCount") if usage.cache_creation_input_tokens is None else None),
        )


def _converse_counts(usage: dict[str, Any]) -> dict[str, Any]:
    """Converse ``usage`` (also Nova's invoke ``usage``, which spells cache fields ...Count)."""
    return {
        "input_tokens": usage.get("inputTokens"),
        "output_tokens": usage.get("outputTokens"),
        "total_tokens": usage.get("totalTokens"),
        "cached_input_tokens": usage.get("cacheReadInputTokens", usage.get("cacheReadInputTokenCount")),
        "cache_creation_input_tokens": usage.get("cacheWriteInputTokens", usage.get("cacheWriteInputTokenCount")),
    }


_M = r"^/model/(?P<model>[^/]+)"
ORDER = 20
PROVIDERS = (Provider("bedrock", "aws.bedrock", (".amazonaws.com",), catalogue=("aws",), openinference=("aws", None), hosts_others=True),)
# Converse stopReason (InvokeModel: the model's own, e.g. the Anthropic module's for Claude)
FINISH_REASONS = {
    "end_turn": STOP,
    "stop_sequence": STOP,
    "max_tokens": LENGTH,
    "tool_use": TOOL_CALLS,
    "guardrail_intervened": CONTENT_FILTER,
    "content_filtered": CONTENT_FILTER,
    "model_context_window_exceeded": LENGTH,
}
ROUTES = [
    route(_M + r"/converse(?:-stream)?$", BedrockConverse, "bedrock"),
    route(_M + r"/invoke(?:-with-response-stream)?$", BedrockInvoke, "bedrock"),
]
