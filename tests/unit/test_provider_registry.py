"""Providers declare themselves in their parser module; the routing, tracing, price catalogue and
finish-reason tables are built from those declarations."""

from __future__ import annotations

import pytest

from extproc import apis
from extproc.apis import routing


def test_every_parser_module_declares_routes_providers_order_and_finish_reasons():
    names = [m.__name__.rsplit(".", 1)[1] for m in apis.modules()]
    assert set(names) == {"mcp", "bedrock", "gemini", "anthropic", "cohere", "ollama", "openai"}
    assert names[0] == "mcp" and names[-1] == "openai"  # specific first, generic suffixes last
    assert all(m.ROUTES for m in apis.modules())
    assert all(isinstance(m.FINISH_REASONS, dict) for m in apis.modules())


def test_provider_names_are_unique_and_hosts_resolve_to_them():
    providers = apis.all_providers()
    assert len({p.name for p in providers}) == len(providers)
    for p in providers:
        for suffix in p.hosts:
            host = "api" + suffix if suffix.startswith(".") else "localhost" + suffix if suffix.startswith(":") else suffix
            assert routing.provider_for_host(host) == p.name, (p.name, host)


@pytest.mark.parametrize(
    "host,name,semconv",
    [
        ("api.openai.com", "openai", "openai"),
        ("myres.openai.azure.com", "azure", "azure.ai.openai"),
        ("api.perplexity.ai", "perplexity", "perplexity"),  # OpenAI-compatible: declared by the openai module
        ("bedrock-runtime.us-east-1.amazonaws.com", "bedrock", "aws.bedrock"),
        ("us-central1-aiplatform.googleapis.com", "vertex_ai", "gcp.vertex_ai"),
        ("localhost:11434", "ollama", "ollama"),
    ],
)
def test_host_and_semantic_convention_names(host, name, semconv):
    assert routing.provider_for_host(host) == name
    assert routing.semconv_name(name) == semconv


def test_unknown_provider_passes_through_and_unknown_host_is_none():
    assert routing.semconv_name("acme") == "acme"
    assert routing.provider_for_host("llm.internal.example") is None


@pytest.mark.parametrize(
    "name,ids",
    [
        ("openai", ("openai",)),
        ("anthropic", ("anthropic",)),
        ("gemini", ("google",)),
        ("vertex_ai", ("google", "anthropic")),  # Claude on Vertex: Anthropic's list when Google's lacks it
        ("bedrock", ("aws",)),
        ("xai", ("x-ai",)),
        ("together", ("together",)),  # named by an operator; no host of its own
    ],
)
def test_price_catalogue_ids_come_from_the_provider_declarations(name, ids):
    assert routing.catalogue_ids()[name] == ids


def test_a_provider_without_catalogue_ids_is_priced_only_by_an_override():
    assert "ollama" not in routing.catalogue_ids() and "mcp" not in routing.catalogue_ids()


def test_finish_reasons_come_from_every_module_and_a_conflict_is_refused(monkeypatch):
    from types import SimpleNamespace

    from extproc.apis import finish

    assert finish.table()["end_turn"] == "stop"  # the anthropic module's
    assert finish.table()["guardrail_intervened"] == "content_filter"  # the bedrock module's
    assert finish.table()["safety"] == "content_filter"  # the gemini module's, declared upper case
    clash = SimpleNamespace(__name__="extproc.apis.acme", FINISH_REASONS={"END_TURN": "length"})
    real = apis.modules()
    monkeypatch.setattr(apis, "modules", lambda: (*real, clash))
    monkeypatch.setattr(finish, "_table", None)
    with pytest.raises(TypeError, match="acme.FINISH_REASONS.*another module maps it to 'stop'"):
        finish.table()
    bad = SimpleNamespace(__name__="extproc.apis.acme", FINISH_REASONS={"DONE": "finished"})
    monkeypatch.setattr(apis, "modules", lambda: (bad,))
    with pytest.raises(TypeError, match="not one of"):
        finish.table()


def test_the_example_upstreams_of_the_reference_envoy_config_name_declared_providers():
    """envoy/envoy.yaml routes example paths to example upstreams and names each one's provider
    (grpc_initial_metadata): example data, kept in step with the provider modules, so a renamed
    provider or host cannot leave the config users copy naming one the sidecar does not know."""
    from urllib.parse import urlsplit

    from extproc.devtools import envoy_config

    router = routing.Router(routing.default_routes())
    upstreams = envoy_config._REFERENCE["upstreams"]
    assert upstreams
    for up in upstreams:
        assert up.provider in routing.declared(), up
        assert routing.provider_for_host(urlsplit(up.url).hostname or "") == up.provider, up
        if up.prefix != "/":  # a path prefix of its own: an API of that provider's module
            match = router.resolve(up.prefix)
            assert match is not None and match.parser.default_provider == up.provider, up
