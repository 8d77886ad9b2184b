"""Ollama's native API: ``/api/chat``, ``/api/generate`` and ``/api/embed`` (``/api/embeddings``).

Chat and generate stream NDJSON unless the request says ``"stream": false``. The final object has
``"done": true`` with ``prompt_eval_count`` -> input and ``eval_count`` -> output (Ollama gives no
total); every object names the ``model``. Only the first line (model) and the ``done`` line are
parsed unless content is captured. ``/api/embed`` reports ``prompt_eval_count``. A stream is
complete at its ``"done": true`` object; an ``error`` line ends it as an error.
(Ollama's OpenAI-compatible ``/v1/...`` endpoints are served by the OpenAI parsers.)
"""

from __future__ import annotations

from typing import Any

from extproc.apis.base import ApiParser, dig
from extproc.apis.finish import LENGTH, STOP
from extproc.apis.routing import Provider, route

_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "num_predict": "max_tokens",
    "seed": "seed",
    "stop": "stop",
}


class _Ollama(ApiParser):
    stream_markers = True
    default_provider = "ollama"
    streams_by_default = True
    input_keys = ("messages", "prompt", "input")

    def on_request_json(self, obj: dict[str, Any]) -> None:
        super().on_request_json(obj)
        if self.streams_by_default:
            self.obs.streaming = obj.get("stream") is not False
        options = obj.get("options")
        if isinstance(options, dict):
            for key, name in _OPTIONS.items():
                value = options.get(key)
                if value is not None:
                    self.obs.params[name] = value

    def want_json_line(self, line: bytes) -> bool:
        return (
            self.capture
            or self.obs.response_model is None
            or line.find(b'"done":true') >= 0
            or line.find(b'"done": true') >= 0
            or line.find(b'"error"') >= 0
        )

    def on_response_json(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.obs.parse_error("response_not_object")
            return
        if "error" in obj and "model" not in obj:  # mid-stream error line
            self.on_error_json(obj)
            self.mark_complete(error=True)
            return
        self.set_response_model(obj.get("model"))
        if self.capture:
            self.capture_text(dig(obj, "message", "content") or obj.get("response"))
        if obj.get("done") is True or "prompt_eval_count" in obj:
            reason = obj.get("done_reason")
            if isinstance(reason, str) and reason:
                self.obs.finish_reasons.append(reason)
            self.set_usage(input_tokens=obj.get("prompt_eval_count"), output_tokens=obj.get("eval_count"))
        if obj.get("done") is True:
            self.mark_complete()


class OllamaChat(_Ollama):
    operation = "chat"
    api = "ollama.chat"


class OllamaGenerate(_Ollama):
    operation = "text_completion"
    api = "ollama.generate"
    system_keys = ("system",)


class OllamaEmbed(_Ollama):
    operation = "embeddings"
    api = "ollama.embed"
    streams_by_default = False


ORDER = 60
# No catalogue: a local model has no public price (price it with a pricing.models override).
PROVIDERS = (Provider("ollama", "ollama", (":11434",), openinference=("ollama", None)),)
FINISH_REASONS = {"stop": STOP, "length": LENGTH}  # done_reason
ROUTES = [
    route(r"^/api/chat$", OllamaChat, "ollama"),
    route(r"^/api/generate$", OllamaGenerate, "ollama"),
    route(r"^/api/embed(?:dings)?$", OllamaEmbed, "ollama"),
]
