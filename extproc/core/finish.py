"""How a call ended, in six words: the providers' finish reasons normalised.

``stop`` (a natural end or a stop sequence), ``length`` (cut by a token limit: a truncated
answer), ``tool_calls`` (the model asks for a tool), ``content_filter`` (a provider-side block:
safety, recitation, refusal, guardrail), ``error`` (the generation failed, or the stream ended
with an error event), ``other`` (anything else). The provider's raw value stays on the span
(``gen_ai.response.finish_reasons``). A call whose response has no finish reason (an error
status, an embedding, a client abort before the end) has none.
"""
from __future__ import annotations

from extproc.core.call import Call

STOP, LENGTH, TOOL_CALLS, CONTENT_FILTER, ERROR, OTHER = "stop", "length", "tool_calls", "content_filter", "error", "other"
REASONS = (STOP, LENGTH, TOOL_CALLS, CONTENT_FILTER, ERROR, OTHER)

_MAP = {
    # OpenAI chat/completions, Ollama done_reason, Mistral, vLLM
    "stop": STOP, "length": LENGTH, "tool_calls": TOOL_CALLS, "function_call": TOOL_CALLS, "content_filter": CONTENT_FILTER,
    "model_length": LENGTH, "eos": STOP, "end": STOP,
    # OpenAI Responses: status, or incomplete_details.reason
    "completed": STOP, "max_output_tokens": LENGTH, "failed": ERROR,
    # Anthropic (also through Bedrock and Vertex)
    "end_turn": STOP, "stop_sequence": STOP, "max_tokens": LENGTH, "tool_use": TOOL_CALLS, "refusal": CONTENT_FILTER,
    "model_context_window_exceeded": LENGTH,
    # Bedrock Converse
    "guardrail_intervened": CONTENT_FILTER, "content_filtered": CONTENT_FILTER,
    # Gemini (upper case on the wire)
    "finish_reason_unspecified": OTHER, "safety": CONTENT_FILTER, "recitation": CONTENT_FILTER,
    "blocklist": CONTENT_FILTER, "prohibited_content": CONTENT_FILTER, "spii": CONTENT_FILTER,
    "image_safety": CONTENT_FILTER, "malformed_function_call": ERROR, "unexpected_tool_call": ERROR,
    # Cohere
    "complete": STOP, "tool_call": TOOL_CALLS, "error": ERROR, "error_toxic": CONTENT_FILTER, "error_limit": LENGTH,
}


def normalise(raw: str) -> str:
    """One provider finish reason as one of :data:`REASONS`."""
    return _MAP.get(raw.strip().lower(), OTHER)


def finish_reason(call: Call) -> str | None:
    """The call's normalised finish reason (its last one: with several choices, the last to
    finish), or None when the response gave none."""
    reasons = call.obs.finish_reasons
    for raw in reversed(reasons):
        if isinstance(raw, str) and raw:
            return normalise(raw)
    return None
