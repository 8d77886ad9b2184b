"""Which parser and provider each API path resolves to."""

from __future__ import annotations

import pytest

from extproc.apis.routing import Router, default_routes, normalise_path
from tests.support.provider_cases import ROUTER

CASES = [
    ("/v1/messages", "AnthropicMessages", None, None),
    ("/anthropic/v1/messages?beta=true", "AnthropicMessages", None, None),
    ("/v1/messages/count_tokens", "AnthropicCountTokens", None, None),
    ("/v1beta/models/gemini-2.0-flash:generateContent", "GeminiGenerate", "gemini", "gemini-2.0-flash"),
    ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", "GeminiStream", "gemini", "gemini-2.0-flash"),
    ("/v1beta/tunedModels/my-tune:generateContent", "GeminiGenerate", "gemini", "my-tune"),
    (
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
        "GeminiGenerate",
        "vertex_ai",
        "gemini-2.5-pro",
    ),
    (
        "/v1beta1/projects/p/locations/global/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
        "GeminiStream",
        "vertex_ai",
        "gemini-2.5-pro",
    ),
    (
        "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict",
        "VertexAnthropic",
        "vertex_ai",
        "claude-sonnet-4@20250514",
    ),
    (
        "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4%4020250514:streamRawPredict",
        "VertexAnthropic",
        "vertex_ai",
        "claude-sonnet-4@20250514",
    ),
    ("/v1/projects/p/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict", "AnthropicCountTokens", "vertex_ai", None),
    ("/v1beta/models/gemini-embedding-001:embedContent", "GeminiEmbed", "gemini", "gemini-embedding-001"),
    ("/v1beta/models/text-embedding-004:batchEmbedContents", "GeminiEmbed", "gemini", "text-embedding-004"),
    (
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-embedding-001:embedContent",
        "GeminiEmbed",
        "vertex_ai",
        "gemini-embedding-001",
    ),
    ("/v1beta/models/gemini-2.5-flash:countTokens", "GeminiCountTokens", "gemini", "gemini-2.5-flash"),
    (
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:countTokens",
        "GeminiCountTokens",
        "vertex_ai",
        "gemini-2.5-pro",
    ),
    (
        "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
        "BedrockConverse",
        "bedrock",
        "anthropic.claude-3-5-sonnet-20240620-v1:0",
    ),
    ("/model/amazon.nova-pro-v1:0/converse-stream", "BedrockConverse", "bedrock", "amazon.nova-pro-v1:0"),
    ("/model/m/invoke", "BedrockInvoke", "bedrock", "m"),
    ("/model/m/invoke-with-response-stream", "BedrockInvoke", "bedrock", "m"),
    ("/v2/chat", "CohereChat", "cohere", None),
    ("/v1/chat", "CohereChatV1", "cohere", None),
    ("/v2/rerank", "CohereRerank", "cohere", None),
    ("/v1/rerank", "CohereRerank", "cohere", None),
    ("/v2/embed", "CohereEmbed", "cohere", None),
    ("/api/chat", "OllamaChat", "ollama", None),
    ("/api/generate", "OllamaGenerate", "ollama", None),
    ("/api/embed", "OllamaEmbed", "ollama", None),
    ("/v1/chat/completions", "OpenAIChat", None, None),
    ("/v1beta/openai/chat/completions", "OpenAIChat", None, None),
    ("/openai/deployments/gpt-4o/chat/completions", "OpenAIChat", "azure", "gpt-4o"),
    ("/v1/embeddings", "OpenAIEmbeddings", None, None),
]


@pytest.mark.parametrize(("path", "parser", "provider", "model"), CASES)
def test_route(path: str, parser: str, provider: str | None, model: str | None) -> None:
    m = ROUTER.resolve(path)
    assert m is not None
    assert (m.parser.__name__, m.provider, m.path_model) == (parser, provider, model)


@pytest.mark.parametrize(
    "path", ["/", "/v1/models", "/api/tags", "/v1/messages/batches", "/model/x/other", "/v1beta/models/gemini:predict", "/healthz"]
)
def test_unknown_paths_stay_unmatched(path: str) -> None:
    assert ROUTER.resolve(path) is None


@pytest.mark.parametrize(
    ("raw", "api"),
    [
        ("/v1/chat/%63ompletions", "openai.chat"),  # an escaped unreserved character
        ("/v1/%65mbeddings", "openai.embeddings"),
        ("//v1//chat///completions", "openai.chat"),  # repeated slashes
        ("/v1/x/../chat/./completions", "openai.chat"),  # dot segments
        ("/v1/chat/%2e%2e/chat/completions", "openai.chat"),  # escaped dot segments
        ("/v1/chat%2Fcompletions", "openai.chat"),  # an escaped slash an upstream decodes
        ("/v1/chat/completions%3Fx", None),  # not the path of any API, decoded or not
    ],
)
def test_the_router_matches_the_path_an_upstream_serves(raw, api):
    """A client cannot dodge observation (and its budget) by spelling a path differently."""
    m = Router(default_routes()).resolve(raw + "?q=1")
    assert (m.parser.api if m else None) == api


def test_an_escaped_slash_inside_a_path_model_still_matches_its_route():
    arn = "arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.anthropic.claude"
    m = Router(default_routes()).resolve(f"/model/{arn}/converse")
    assert m is not None and m.path_model == "arn:aws:bedrock:us-east-1:1:inference-profile/us.anthropic.claude"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b/../c", "/a/c"),
        ("/a/./b/.", "/a/b/"),
        ("/..", "/"),
        ("/a/b/..", "/a/"),
        ("/x%2fy%7e", "/x%2Fy~"),
        ("/v1/chat/completions", "/v1/chat/completions"),
    ],
)
def test_normalise_path_follows_rfc_3986(raw, normal):
    assert normalise_path(raw) == normal
