"""One parser module per API schema; each exports ``ROUTES`` (see ``extproc.apis.routing``).

Order matters: specific patterns first, the generic OpenAI-compatible suffixes last.
"""
from __future__ import annotations

from extproc.apis.routing import Route


def all_routes() -> list[Route]:
    from extproc.apis import anthropic, bedrock, cohere, gemini, mcp, ollama, openai

    return [
        *mcp.ROUTES,  # POST /mcp: JSON-RPC (tool calls)
        *bedrock.ROUTES,
        *gemini.ROUTES,  # Vertex AI (incl. Claude on Vertex) and the Gemini API
        *anthropic.ROUTES,
        *cohere.ROUTES,
        *ollama.ROUTES,
        *openai.ROUTES,  # Azure first inside it; the generic OpenAI-compatible suffixes last
    ]
