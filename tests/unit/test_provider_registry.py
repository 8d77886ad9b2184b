"""Providers declare themselves in their parser module; the routing and tracing tables are built
from those declarations."""
from __future__ import annotations

import pytest

from extproc import apis
from extproc.apis import routing


def test_every_parser_module_declares_routes_providers_and_order():
    names = [m.__name__.rsplit(".", 1)[1] for m in apis.modules()]
    assert set(names) == {"mcp", "bedrock", "gemini", "anthropic", "cohere", "ollama", "openai"}
    assert names[0] == "mcp" and names[-1] == "openai"  # specific first, generic suffixes last
    assert all(m.ROUTES for m in apis.modules())


def test_provider_names_are_unique_and_hosts_resolve_to_them():
    providers = apis.all_providers()
    assert len({p.name for p in providers}) == len(providers)
    for p in providers:
        for suffix in p.hosts:
            host = ("api" + suffix if suffix.startswith(".") else "localhost" + suffix if suffix.startswith(":") else suffix)
            assert routing.provider_for_host(host) == p.name, (p.name, host)


@pytest.mark.parametrize("host,name,semconv", [
    ("api.openai.com", "openai", "openai"),
    ("myres.openai.azure.com", "azure", "azure.ai.openai"),
    ("api.perplexity.ai", "perplexity", "perplexity"),  # OpenAI-compatible: declared by the openai module
    ("bedrock-runtime.us-east-1.amazonaws.com", "bedrock", "aws.bedrock"),
    ("us-central1-aiplatform.googleapis.com", "vertex_ai", "gcp.vertex_ai"),
    ("localhost:11434", "ollama", "ollama"),
])
def test_host_and_semantic_convention_names(host, name, semconv):
    assert routing.provider_for_host(host) == name
    assert routing.semconv_name(name) == semconv


def test_unknown_provider_passes_through_and_unknown_host_is_none():
    assert routing.semconv_name("acme") == "acme"
    assert routing.provider_for_host("llm.internal.example") is None
