"""Length bounds on values a client or upstream chooses (model names, provider names, error types,
MCP method and tool names, ids) before they become a metric label, a dynamic-metadata value or a
span attribute: a model string is a label value, not a place for a payload (docs/security.md).
"""

from __future__ import annotations

from typing import Any

MAX_VALUE_CHARS = 128  # a label / metadata / attribute value; longer ones are cut
MAX_LIST_ITEMS = 16  # list-valued span attributes (finish reasons, stop sequences)


def clip(value: str) -> str:
    """``value`` cut to :data:`MAX_VALUE_CHARS` characters."""
    return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS]


def clip_opt(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS]


def bounded_attribute(value: Any, max_chars: int = MAX_VALUE_CHARS) -> Any:
    """A string cut to ``max_chars``, a list to 16 items of that length; numbers as they are."""
    if isinstance(value, str):
        return value if len(value) <= max_chars else value[:max_chars]
    if isinstance(value, list):
        return [v[:max_chars] if isinstance(v, str) else v for v in value[:MAX_LIST_ITEMS]]
    return value
