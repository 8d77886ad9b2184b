"""OpenLLMetry (Traceloop) span attributes (``tracing.conventions: [openllmetry]``), for backends
and dashboards built on its names.

Names from OpenLLMetry's ``opentelemetry-semantic-conventions-ai`` package (``SpanAttributes``,
``LLMRequestTypeValues``; https://github.com/traceloop/openllmetry/blob/main/packages/opentelemetry-semantic-conventions-ai/opentelemetry/semconv_ai/__init__.py,
documented at https://traceloop.com/docs/openllmetry/contributing/semantic-conventions):
its 0.5 release moved to the OpenTelemetry GenAI names (``gen_ai.usage.input_tokens``...,
which ``[genai]`` writes), and keeps the older names its instrumentations and Traceloop's
dashboards still read. This module writes the names ``[genai]`` does not: ``llm.request.type``,
``llm.is_streaming`` / ``gen_ai.is_streaming``, ``llm.usage.total_tokens`` /
``gen_ai.usage.total_tokens``, ``gen_ai.usage.prompt_tokens`` / ``completion_tokens``, the cache
counts under their older underscore names, ``llm.usage.reasoning_tokens`` /
``gen_ai.usage.reasoning_tokens``, ``llm.user`` / ``gen_ai.user``,
``llm.response.finish_reason``, and with content capture ``gen_ai.prompt.N.role/content`` (the
last 16 messages) and ``gen_ai.completion.0.role/content/finish_reason``. Counts are our
normalised ones (prompt: every input token, cache reads and writes included; OpenLLMetry's
Anthropic instrumentation adds them up the same way).
"""

from __future__ import annotations

from typing import Any

from extproc.core.bounded import MAX_LIST_ITEMS, clip
from extproc.core.call import Call
from extproc.telemetry.openinference import prompt_messages

LLM_REQUEST_TYPE = "llm.request.type"
LLM_IS_STREAMING = "llm.is_streaming"
GEN_AI_IS_STREAMING = "gen_ai.is_streaming"
LLM_USAGE_TOTAL_TOKENS = "llm.usage.total_tokens"
GEN_AI_USAGE_TOTAL_TOKENS = "gen_ai.usage.total_tokens"
LLM_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
LLM_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
LLM_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read_input_tokens"
LLM_USAGE_CACHE_CREATION_INPUT_TOKENS = "gen_ai.usage.cache_creation_input_tokens"
LLM_USAGE_REASONING_TOKENS = "llm.usage.reasoning_tokens"
GEN_AI_USAGE_REASONING_TOKENS = "gen_ai.usage.reasoning_tokens"
LLM_USER = "llm.user"
GEN_AI_USER = "gen_ai.user"
LLM_RESPONSE_FINISH_REASON = "llm.response.finish_reason"
LLM_PROMPTS = "gen_ai.prompt"
LLM_COMPLETIONS = "gen_ai.completion"

# Our operation -> LLMRequestTypeValues
REQUEST_TYPES = {"chat": "chat", "generate_content": "chat", "text_completion": "completion", "embeddings": "embedding", "rerank": "rerank"}
UNKNOWN = "unknown"


def add_attributes(a: dict[str, Any], call: Call, capture: bool, max_chars: int) -> None:
    if call.api == "mcp":
        return  # MCP spans: mcp.method.name etc., as OpenLLMetry's MCP instrumentation names them
    obs = call.obs
    u = obs.usage
    a[LLM_REQUEST_TYPE] = REQUEST_TYPES.get(obs.operation, UNKNOWN)
    a[LLM_IS_STREAMING] = a[GEN_AI_IS_STREAMING] = obs.streaming
    total = u.total()
    if total is not None:
        a[LLM_USAGE_TOTAL_TOKENS] = a[GEN_AI_USAGE_TOTAL_TOKENS] = total
    if u.input_tokens is not None:
        a[LLM_USAGE_PROMPT_TOKENS] = u.input_tokens
    if u.output_tokens is not None:
        a[LLM_USAGE_COMPLETION_TOKENS] = u.output_tokens
    if u.cached_input_tokens is not None:
        a[LLM_USAGE_CACHE_READ_INPUT_TOKENS] = u.cached_input_tokens
    if u.cache_creation_input_tokens is not None:
        a[LLM_USAGE_CACHE_CREATION_INPUT_TOKENS] = u.cache_creation_input_tokens
    if u.reasoning_tokens is not None:
        a[LLM_USAGE_REASONING_TOKENS] = a[GEN_AI_USAGE_REASONING_TOKENS] = u.reasoning_tokens
    user = call.end_user
    if user:
        a[LLM_USER] = a[GEN_AI_USER] = user
    finish = clip(str(obs.finish_reasons[-1])) if obs.finish_reasons else None
    if finish is not None:
        a[LLM_RESPONSE_FINISH_REASON] = finish
    if capture and obs.input_messages is not None:
        messages = prompt_messages(obs.input_messages, max_chars)
        for i, m in enumerate(messages[max(len(messages) - MAX_LIST_ITEMS, 0) :]):
            a[f"{LLM_PROMPTS}.{i}.role"] = m["role"]
            a[f"{LLM_PROMPTS}.{i}.content"] = m["content"]
    if capture and obs.output_text:
        a[f"{LLM_COMPLETIONS}.0.role"] = "assistant"
        a[f"{LLM_COMPLETIONS}.0.content"] = "".join(obs.output_text)[:max_chars]
        if finish is not None:
            a[f"{LLM_COMPLETIONS}.0.finish_reason"] = finish
