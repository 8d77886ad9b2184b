"""Google Gemini API and Vertex AI: ``:generateContent`` and ``:streamGenerateContent``.

The model is in the path (``.../models/{model}:generateContent``); the response's
``modelVersion`` is the response model. ``usageMetadata``: promptTokenCount -> input (it includes
cachedContentTokenCount), candidatesTokenCount + thoughtsTokenCount -> output (Gemini's
candidatesTokenCount EXCLUDES thoughts, which are billed as output: declared by
``output_excludes_reasoning``), totalTokenCount -> total (kept as reported), cachedContentTokenCount
-> cached_input, thoughtsTokenCount -> reasoning.

``:embedContent``/``:batchEmbedContents`` (embeddings; usage only where Vertex reports it) and
``:countTokens`` (a count, kept apart from usage) are recognised too.

Streams come as SSE (``?alt=sse``) or, by default, as one JSON array streamed element by element.
Each streamed chunk repeats the cumulative ``usageMetadata``: the last one wins. A stream is
complete at the chunk whose candidate has a ``finishReason`` (it also carries the final usage);
one abandoned earlier reports the cumulative usage of the last chunk it saw, which is what Google
reported for the tokens produced so far. An error element ends it as an error.

Claude on Vertex (``publishers/anthropic/...:rawPredict``) is routed here to the Anthropic parser.
"""

from __future__ import annotations

from typing import Any, ClassVar

from extproc.apis.anthropic import AnthropicCountTokens, VertexAnthropic
from extproc.apis.base import JSON, JSON_ARRAY, ApiParser, dig, items
from extproc.apis.finish import CONTENT_FILTER, ERROR, LENGTH, OTHER, STOP
from extproc.apis.routing import Provider, route

_CONFIG_PARAMS = {
    "temperature": "temperature",
    "topP": "top_p",
    "topK": "top_k",
    "maxOutputTokens": "max_tokens",
    "candidateCount": "n",
    "seed": "seed",
    "stopSequences": "stop",
}


def _message(m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    content = m.get("content", m)
    parts = content.get("parts") if isinstance(content, dict) else None
    if parts is None:
        return m
    return {"role": content.get("role") or m.get("role") or "user", "content": parts}


class GeminiGenerate(ApiParser):
    operation = "generate_content"
    api = "gemini.generate_content"
    default_provider = "gemini"
    output_excludes_reasoning = True  # candidatesTokenCount leaves out thoughtsTokenCount
    input_keys: ClassVar[tuple[str, ...]] = ("contents",)
    system_keys: ClassVar[tuple[str, ...]] = ("systemInstruction", "system_instruction")
    role_names: ClassVar[dict[str, str]] = {"model": "assistant"}  # Content.role: user | model

    def on_request_json(self, obj: dict[str, Any]) -> None:
        # The model is in the path; a body "model" (rare) does not override it.
        config = obj.get("generationConfig")
        if isinstance(config, dict):
            for key, name in _CONFIG_PARAMS.items():
                value = config.get(key)
                if value is not None:
                    self.obs.params[name] = value

    def common_messages(self, value: Any) -> Any:
        """Gemini ``Content`` objects (``{role, parts}``; in a batch embedding request each
        ``{model, content: Content}``) as ``{role, content: parts}``."""
        return [_message(m) for m in value] if isinstance(value, list) else _message(value)

    def on_error_json(self, obj: Any) -> None:
        """Google errors: ``{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}``, wrapped in
        a one-element array on stream endpoints. The status name is the error type."""
        if isinstance(obj, list) and obj:
            obj = obj[0]
        status = dig(obj, "error", "status")
        if isinstance(status, str) and status:
            self.obs.error_type = status[:64]
        else:
            super().on_error_json(obj)

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        if "error" in obj and "candidates" not in obj:  # an error element inside a stream
            self.on_error_json(obj)
            self.mark_complete(error=True)
            return
        self.set_response_model(obj.get("modelVersion"))
        rid = obj.get("responseId")
        if isinstance(rid, str) and rid and self.obs.response_id is None:
            self.obs.response_id = rid
        finished = False
        for cand in items(obj.get("candidates")):
            if not isinstance(cand, dict):
                continue
            reason = cand.get("finishReason")
            if isinstance(reason, str) and reason:
                self.obs.finish_reasons.append(reason)
                finished = True
            if self.capture:
                content = cand.get("content")
                for part in items(content.get("parts") if isinstance(content, dict) else None):
                    if isinstance(part, dict) and not part.get("thought"):
                        self.capture_text(part.get("text"))
        self.usage_metadata(obj)
        if finished:
            self.mark_complete()

    def usage_metadata(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            self.set_usage(
                input_tokens=usage.get("promptTokenCount"),
                output_tokens=usage.get("candidatesTokenCount"),
                total_tokens=usage.get("totalTokenCount"),
                cached_input_tokens=usage.get("cachedContentTokenCount"),
                reasoning_tokens=usage.get("thoughtsTokenCount"),
            )
            tool = usage.get("toolUsePromptTokenCount")
            if tool is not None:
                self.obs.extra["tool_use_prompt_tokens"] = tool


class GeminiEmbed(GeminiGenerate):
    """``:embedContent`` and ``:batchEmbedContents``. The Gemini API returns only the vectors;
    Vertex AI adds ``usageMetadata`` (promptTokenCount), read when present."""

    operation = "embeddings"
    api = "gemini.embed_content"
    input_keys: ClassVar[tuple[str, ...]] = ("content", "requests")
    system_keys: ClassVar[tuple[str, ...]] = ()

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        self.usage_metadata(obj)


class GeminiCountTokens(AnthropicCountTokens):
    """``:countTokens`` -> ``{"totalTokens": N}``: a count, not usage (see AnthropicCountTokens)."""

    priced = False

    api = "gemini.count_tokens"
    default_provider = "gemini"
    count_key = "totalTokens"


class GeminiStream(GeminiGenerate):
    """``:streamGenerateContent``: SSE with ``?alt=sse``, else a streamed JSON array."""

    stream_markers = True

    def framing_for(self, status: int, content_type: str) -> str:
        framing = super().framing_for(status, content_type)
        if framing == JSON and status < 400:
            return JSON_ARRAY
        return framing

    def on_request_json(self, obj: dict[str, Any]) -> None:
        super().on_request_json(obj)
        self.obs.streaming = True

    def want_sse_event(self, event: bytes, data: bytes) -> bool:
        return (
            self.capture
            or self.obs.response_model is None
            or data.find(b'"usageMetadata"') >= 0
            or data.find(b'"finishReason"') >= 0
            or data.find(b'"error"', 0, 32) >= 0
        )

    def on_sse_event(self, event: bytes, obj: Any) -> None:
        self.on_response_json(obj)


_VERTEX = r"^/v1(?:beta1)?/projects/[^/]+/locations/[^/]+/publishers/"
_MODEL = r"(?P<model>[^/:]+)"
ORDER = 30  # Vertex AI (incl. Claude on Vertex) and the Gemini API
PROVIDERS = (
    Provider("gemini", "gcp.gemini", ("generativelanguage.googleapis.com",), catalogue=("google",), openinference=("google", None)),
    # Vertex AI also serves Claude: priced from Anthropic's list when Google's does not name the model
    Provider(
        "vertex_ai",
        "gcp.vertex_ai",
        ("aiplatform.googleapis.com",),
        catalogue=("google", "anthropic"),
        openinference=("google", "vertexai"),
        hosts_others=True,
    ),
)
# candidates[].finishReason (Claude on Vertex: the Anthropic module's stop reasons)
FINISH_REASONS = {
    "STOP": STOP,
    "MAX_TOKENS": LENGTH,
    "FINISH_REASON_UNSPECIFIED": OTHER,
    "SAFETY": CONTENT_FILTER,
    "RECITATION": CONTENT_FILTER,
    "BLOCKLIST": CONTENT_FILTER,
    "PROHIBITED_CONTENT": CONTENT_FILTER,
    "SPII": CONTENT_FILTER,
    "IMAGE_SAFETY": CONTENT_FILTER,
    "MALFORMED_FUNCTION_CALL": ERROR,
    "UNEXPECTED_TOOL_CALL": ERROR,
}
ROUTES = [
    route(_VERTEX + r"anthropic/models/count-tokens:rawPredict$", AnthropicCountTokens, "vertex_ai"),
    route(_VERTEX + r"anthropic/models/" + _MODEL + r":(?:stream)?[rR]awPredict$", VertexAnthropic, "vertex_ai"),
    route(_VERTEX + r"google/models/" + _MODEL + r":generateContent$", GeminiGenerate, "vertex_ai"),
    route(_VERTEX + r"google/models/" + _MODEL + r":streamGenerateContent$", GeminiStream, "vertex_ai"),
    route(r"/v1(?:alpha|beta)?/(?:tuned)?[mM]odels/" + _MODEL + r":generateContent$", GeminiGenerate, "gemini"),
    route(r"/v1(?:alpha|beta)?/(?:tuned)?[mM]odels/" + _MODEL + r":streamGenerateContent$", GeminiStream, "gemini"),
    route(_VERTEX + r"google/models/" + _MODEL + r":(?:batchEmbedContents|embedContent)$", GeminiEmbed, "vertex_ai"),
    route(_VERTEX + r"google/models/" + _MODEL + r":countTokens$", GeminiCountTokens, "vertex_ai"),
    route(r"/v1(?:alpha|beta)?/[mM]odels/" + _MODEL + r":(?:batchEmbedContents|embedContent)$", GeminiEmbed, "gemini"),
    route(r"/v1(?:alpha|beta)?/(?:tuned)?[mM]odels/" + _MODEL + r":countTokens$", GeminiCountTokens, "gemini"),
]
