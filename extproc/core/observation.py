"""What one LLM call looked like, as learned from its payloads.

A parser (``extproc.apis``) fills an :class:`Observation`; the servicer turns it into dynamic
metadata while the call runs, and metrics/tracing read it once when the call ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Usage:
    """Token usage in one meaning whatever the provider (``None``: not reported).

    The parser derives it from the counts as reported, by its API's declared semantics
    (``extproc.apis.base``; the table per API is in docs/metrics.md, Token semantics). Every
    output (metadata, metrics, spans, budgets, cost) reads these fields as they are."""

    input_tokens: int | None = None  # every input token processed: uncached + cache read + cache write
    output_tokens: int | None = None  # every output token billed: visible + reasoning
    total_tokens: int | None = None  # the provider's total, when it reports one
    cached_input_tokens: int | None = None  # part of input_tokens read from the provider's cache
    cache_creation_input_tokens: int | None = None  # part of input_tokens written to the cache
    reasoning_tokens: int | None = None  # part of output_tokens spent on hidden reasoning

    def seen(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None or self.total_tokens is not None

    def total(self) -> int | None:
        """The provider's total, else input + output when either is known."""
        if self.total_tokens is not None:
            return self.total_tokens
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


@dataclass(slots=True)
class Observation:
    """Everything a parser learned about one call. Parsers only ever write known values."""

    operation: str = "unknown"  # GenAI operation name: chat, text_completion, embeddings, ...
    request_model: str | None = None
    response_model: str | None = None
    streaming: bool = False
    usage: Usage = field(default_factory=Usage)
    response_id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # request parameters (temperature, ...)
    end_user: str | None = None  # the request body's end-user id (OpenAI user, Anthropic metadata.user_id), <= 128 chars
    error_type: str | None = None  # provider error type/code from an error body
    parse_errors: int = 0  # payloads we could not parse (counted, never raised)
    parse_error_reason: str | None = None
    message_count: int | None = None  # the request's prompt messages (inputs), counted with or without capture
    # Content capture (off unless tracing asks for it): request messages and the completion text.
    input_messages: Any = None
    # input_messages[0] is a system prompt the API took beside the messages (Anthropic system, Gemini
    # systemInstruction, Responses instructions), not one of them: GenAI's gen_ai.system_instructions
    system_apart: bool = False
    output_text: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # API-specific facts (e.g. MCP method)

    def parse_error(self, reason: str) -> None:
        self.parse_errors += 1
        if self.parse_error_reason is None:
            self.parse_error_reason = reason
