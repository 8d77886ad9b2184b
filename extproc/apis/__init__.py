"""One parser module per API schema; each exports ``ROUTES`` (see ``extproc.routing``).

Order matters: specific patterns first, the generic OpenAI-compatible suffixes last.
"""
from __future__ import annotations

from extproc.routing import Route


def all_routes() -> list[Route]:
    from extproc.apis import mcp, openai

    return [*mcp.ROUTES, *openai.ROUTES]
