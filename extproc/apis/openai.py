"""OpenAI API family: chat completions, legacy completions, embeddings and the Responses API.

Also serves Azure OpenAI (``/openai/deployments/{name}/...``) and OpenAI-compatible servers
(Mistral, vLLM, Ollama's ``/v1``, Gemini's OpenAI endpoint): same schema, other hosts.
"""

from __future__ import annotations

import re
from typing import Any

from extproc.apis.base import DEFAULT_LIMITS, ApiParser, Limits, dig, items
from extproc.apis.finish import CONTENT_FILTER, ERROR, LENGTH, STOP, TOOL_CALLS
from extproc.apis.routing import Provider, route
from extproc.core.observation import Observation

_SAMPLING = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "n",
    "stop",
    "reasoning_effort",
    "service_tier",
)


# Where a chat chunk may carry what ``want_sse_event`` looks for: one scan instead of three
# substring searches for the chunks that carry neither (text deltas, most of a stream). A
# ``"usage":null`` does not match: with ``stream_options.include_usage`` every text delta carries
# one, and the searches below reject it anyway.
_USAGE_OR_FINISH = re.compile(rb'"usage"(?!:null)|"finish_reason": ?"').search

# The end user: OpenAI's safety_identifier (its newer name), else the older user field.
_END_USER = (("safety_identifier",), ("user",))


def _service_tier(parser: ApiParser, obj: dict[str, Any]) -> None:
    """The tier that served the call (``default``, ``flex``, ``priority``...): it sets the price."""
    tier = obj.get("service_tier")
    if isinstance(tier, str) and tier:
        parser.obs.extra["service_tier"] = tier[:32]


class _ChatLike(ApiParser):
    """Chat and legacy completions share usage and streaming shapes.

    A stream is complete at ``data: [DONE]``, or at the chunk that brings the usage once every
    choice has its ``finish_reason`` (with ``include_usage`` the usage chunk follows the last
    finish; some compatible servers put both in one chunk). A finish reason alone is not the end:
    the usage chunk may still be on its way."""

    default_provider = "openai"
    stream_markers = True

    def __init__(self, obs: Observation, *, path_model: str | None = None, limits: Limits = DEFAULT_LIMITS, capture: bool = False) -> None:
        super().__init__(obs, path_model=path_model, limits=limits, capture=capture)
        self._finished: set[Any] = set()  # choice indexes that have their finish_reason

    param_keys = _SAMPLING
    input_keys = ("messages", "prompt")
    end_user_keys = _END_USER

    def on_request_json(self, obj: dict[str, Any]) -> None:
        super().on_request_json(obj)
        opts = obj.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            self.obs.extra["include_usage"] = True

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        self._common(obj)
        for choice in items(obj.get("choices")):
            if isinstance(choice, dict):
                self._choice(choice, streamed=False)

    def want_sse_event(self, event: bytes, data: bytes) -> bool:
        # Parse the first chunk (model, id), chunks carrying usage or a finish reason, an
        # in-stream error (it ends the stream), and every chunk when content is captured. A text
        # delta costs a prefix check and one scan (``_USAGE_OR_FINISH``, which every chunk the
        # searches below want matches).
        if self.capture or self.obs.response_model is None or data.startswith(b'{"error"'):
            return True
        if _USAGE_OR_FINISH(data) is None:
            return False
        return (
            (data.find(b'"usage"') >= 0 and data.find(b'"usage":null') < 0)
            or data.find(b'"finish_reason":"') >= 0
            or data.find(b'"finish_reason": "') >= 0
        )

    def on_sse_event(self, event: bytes, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        if "error" in obj and "choices" not in obj:
            self.on_error_json(obj)
            self.mark_complete(error=True)  # the stream ends with the error
            return
        self._common(obj)
        for choice in items(obj.get("choices")):
            if isinstance(choice, dict):
                self._choice(choice, streamed=True)
        if self._finished and self.obs.usage.seen():
            n = self.obs.params.get("n")
            if len(self._finished) >= (n if type(n) is int and n > 1 else 1):
                self.mark_complete()

    def on_sse_done(self) -> None:
        self.mark_complete()

    def _common(self, obj: dict[str, Any]) -> None:
        self.set_response_model(obj.get("model"))
        rid = obj.get("id")
        if isinstance(rid, str) and self.obs.response_id is None:
            self.obs.response_id = rid
        _service_tier(self, obj)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details")  # (``dig``, inline)
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            details = usage.get("completion_tokens_details")
            reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
            self.set_usage(
                input_tokens=usage.get("prompt_tokens"),
                output_tokens=usage.get("completion_tokens"),
                total_tokens=usage.get("total_tokens"),
                cached_input_tokens=cached,
                reasoning_tokens=reasoning,
            )

    def _choice(self, choice: dict[str, Any], streamed: bool) -> None:
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self.obs.finish_reasons.append(reason)
            index = choice.get("index", 0)
            self._finished.add(index if isinstance(index, int) else 0)
        if self.capture:
            if streamed:
                self.capture_text(dig(choice, "delta", "content") or choice.get("text"))
            else:
                self.capture_text(dig(choice, "message", "content") or choice.get("text"))


class OpenAIChat(_ChatLike):
    operation = "chat"
    api = "openai.chat"


class OpenAICompletions(_ChatLike):
    operation = "text_completion"
    api = "openai.completions"


class OpenAIEmbeddings(ApiParser):
    operation = "embeddings"
    api = "openai.embeddings"
    default_provider = "openai"
    param_keys = ("dimensions", "encoding_format")
    input_keys = ("input",)
    end_user_keys = _END_USER

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        self.set_response_model(obj.get("model"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.set_usage(input_tokens=usage.get("prompt_tokens"), total_tokens=usage.get("total_tokens"))


class OpenAIResponses(ApiParser):
    """The Responses API: usage arrives in the final ``response.completed`` event. A stream is
    complete at ``response.completed``, ``response.incomplete`` (cut short by a limit, still a
    whole response) or ``response.failed`` (an error)."""

    stream_markers = True
    operation = "chat"
    api = "openai.responses"
    default_provider = "openai"
    param_keys = ("temperature", "top_p", "max_output_tokens", "service_tier")
    input_keys = ("input",)
    system_keys = ("instructions",)
    end_user_keys = _END_USER
    _USEFUL = (b"response.created", b"response.completed", b"response.incomplete", b"response.failed")

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        self._response(obj)

    def want_sse_event(self, event: bytes, data: bytes) -> bool:
        if event:
            return event in self._USEFUL or (self.capture and event == b"response.output_text.delta")
        return any(name in data[:200] for name in self._USEFUL) or self.capture

    def on_sse_event(self, event: bytes, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "response.output_text.delta":
            self.capture_text(obj.get("delta"))
            return
        response = obj.get("response")
        if isinstance(response, dict):
            self._response(response, streamed=True)
            if kind == "response.failed":
                err = response.get("error")
                code = err.get("code") if isinstance(err, dict) else None
                self.obs.error_type = str(code or "response.failed")[:64]
        if kind in ("response.completed", "response.incomplete"):
            self.mark_complete()
        elif kind == "response.failed":
            self.mark_complete(error=True)

    def _response(self, obj: dict[str, Any], streamed: bool = False) -> None:
        self.set_response_model(obj.get("model"))
        rid = obj.get("id")
        if isinstance(rid, str):
            self.obs.response_id = rid
        _service_tier(self, obj)
        status = obj.get("status")
        if isinstance(status, str) and status not in ("in_progress", "queued"):
            # incomplete: why (max_output_tokens, content_filter) says more than the status
            why = dig(obj, "incomplete_details", "reason") if status == "incomplete" else None
            self.obs.finish_reasons.append(why if isinstance(why, str) and why else status)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.set_usage(
                input_tokens=usage.get("input_tokens"),
                output_tokens=usage.get("output_tokens"),
                total_tokens=usage.get("total_tokens"),
                cached_input_tokens=dig(usage, "input_tokens_details", "cached_tokens"),
                reasoning_tokens=dig(usage, "output_tokens_details", "reasoning_tokens"),
            )
        if self.capture and not streamed:
            for item in items(obj.get("output")):
                for part in items(dig(item, "content")):
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        self.capture_text(part.get("text"))


_AZ = r"^/openai/deployments/(?P<model>[^/]+)"
ORDER = 100  # last: the generic OpenAI-compatible suffixes match almost anything
PROVIDERS = (
    Provider("openai", "openai", ("api.openai.com",), catalogue=("openai",), openinference=("openai", "openai")),
    Provider(
        "azure",
        "azure.ai.openai",
        (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com"),
        catalogue=("azure",),
        openinference=("azure", "openai"),
    ),  # Azure hosts OpenAI's models
    # OpenAI-compatible APIs: the same schema on other hosts.
    Provider(
        "mistral",
        "mistral_ai",
        ("api.mistral.ai",),
        catalogue=("mistral",),
        openinference=("mistralai", "mistralai"),
        model_markers=("mistral",),
    ),
    Provider("groq", "groq", ("api.groq.com",), catalogue=("groq",), openinference=("groq", None)),
    Provider("deepseek", "deepseek", ("api.deepseek.com",), catalogue=("deepseek",), openinference=("deepseek", None)),
    Provider("xai", "x_ai", ("api.x.ai",), catalogue=("x-ai",), openinference=("xai", None)),
    Provider("openrouter", "openrouter", ("openrouter.ai",), catalogue=("openrouter",)),
    Provider("perplexity", "perplexity", ("api.perplexity.ai",), catalogue=("perplexity",), openinference=("perplexity", None)),
    # Named by an operator (providers.header, x-llm-provider, providers.routes): no host of their own here.
    Provider("together", "together", catalogue=("together",)),
    Provider("fireworks", "fireworks", catalogue=("fireworks",)),
    Provider("cerebras", "cerebras", catalogue=("cerebras",)),
)
FINISH_REASONS = {
    # chat/completions finish_reason (also Mistral, vLLM, other OpenAI-compatible servers)
    "stop": STOP,
    "length": LENGTH,
    "tool_calls": TOOL_CALLS,
    "function_call": TOOL_CALLS,
    "content_filter": CONTENT_FILTER,
    "model_length": LENGTH,
    "eos": STOP,
    "end": STOP,
    "error": ERROR,
    # Responses: status, or incomplete_details.reason
    "completed": STOP,
    "max_output_tokens": LENGTH,
    "failed": ERROR,
}
ROUTES = [
    route(_AZ + r"/chat/completions$", OpenAIChat, "azure"),
    route(_AZ + r"/completions$", OpenAICompletions, "azure"),
    route(_AZ + r"/embeddings$", OpenAIEmbeddings, "azure"),
    route(r"^/openai/(?:v1/)?responses$", OpenAIResponses, "azure"),
    route(r"^/openai/v1/chat/completions$", OpenAIChat, "azure"),
    route(r"^/openai/v1/embeddings$", OpenAIEmbeddings, "azure"),
    # OpenAI and every OpenAI-compatible server (Mistral, vLLM, Ollama /v1, Gemini's /openai/).
    route(r"/chat/completions$", OpenAIChat),
    route(r"/completions$", OpenAICompletions),
    route(r"/embeddings$", OpenAIEmbeddings),
    route(r"/responses$", OpenAIResponses),
]
