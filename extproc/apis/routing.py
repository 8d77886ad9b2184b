"""Which API schema a request speaks, and which provider serves it.

Each parser module in ``extproc.apis`` declares ``ROUTES``: path patterns (matched against the
path without its query string) mapped to a parser class, an optional provider implied by the path,
and an optional named group ``model`` for APIs that carry the model in the path; and ``PROVIDERS``:
the providers it serves, with their host suffixes, GenAI semantic-convention names and price
catalogue ids. The tables here are built from those declarations (see ``extproc.apis``).
Operators add their own path mappings in config (``providers.routes``); those are tried first.

The provider is, in order: the per-route ext_proc ``grpc_initial_metadata`` (``x-llm-provider``),
the configured provider header (not with budgets: a client would choose its price), a config path
mapping, the request host, the path, and finally the parser's default.

Paths are matched normalised (:func:`normalise_path`), as the upstream serves them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from extproc.apis.base import ApiParser


@dataclass(frozen=True, slots=True)
class Route:
    pattern: re.Pattern[str]
    parser: type[ApiParser]
    provider: str | None = None  # provider the path itself implies (e.g. Azure deployments)


@dataclass(frozen=True, slots=True)
class Match:
    parser: type[ApiParser]
    provider: str | None
    path_model: str | None


def route(pattern: str, parser: type[ApiParser], provider: str | None = None) -> Route:
    return Route(re.compile(pattern), parser, provider)


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider as the labels name it (``llm``), recognised by the host it is called on.

    ``catalogue`` names the provider in the ``genai-prices`` catalogue, fallbacks after the first
    (Claude on Vertex AI: ``("google", "anthropic")``). A provider without one (Ollama, a
    self-hosted server) is priced only by a configured override: public prices say nothing about
    a private server."""

    name: str  # short name: the ``llm``/``provider`` label, the access log's ``provider``
    semconv: str  # ``gen_ai.provider.name`` (OpenTelemetry GenAI semantic conventions)
    hosts: tuple[str, ...] = ()  # host suffixes ("api.openai.com", ".amazonaws.com"); ":port" matches anywhere
    catalogue: tuple[str, ...] = ()  # genai-prices provider ids, tried in order
    # OpenInference (llm.provider, llm.system) values, as its own instrumentations set them
    # (system None: the package has none); None: llm.provider is our name, no llm.system
    openinference: tuple[str, str | None] | None = None
    hosts_others: bool = False  # serves other makers' models (Bedrock, Vertex AI): the model id names the maker
    model_markers: tuple[str, ...] = ()  # substrings of a (lower-case) model id naming this provider as its maker


_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_SLASHES = re.compile(r"//+")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _unreserved(m: re.Match[str]) -> str:
    c = chr(int(m.group(0)[1:], 16))
    return c if c in _UNRESERVED else m.group(0).upper()


def _without_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for seg in segments:
        if seg == "..":
            if len(out) > 1:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")  # /a/b/.. is the directory /a/
    return "/".join(out) if out != [""] else "/"


def normalise_path(path: str) -> str:
    """The path as an upstream serves it (RFC 3986 section 6.2.2, plus merged slashes):
    percent-encoded unreserved characters decoded (``%63`` is ``c``), other escapes upper-cased,
    repeated slashes merged, dot segments resolved. What Envoy's ``normalize_path`` and
    ``merge_slashes`` do (the generated configs set both), done here too for Envoy configs
    without them: a client cannot dodge observation (and its budget) by spelling a path
    differently from the routes."""
    if "%" in path:
        path = _ESCAPE.sub(_unreserved, path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = _without_dot_segments(path)
    return path


class Router:
    def __init__(self, routes: list[Route], extra: list[Route] | None = None) -> None:
        self._routes = [*(extra or ()), *routes]
        self._resolve = lru_cache(maxsize=4096)(self._resolve_uncached)

    def resolve(self, path: str) -> Match | None:
        """The route of a request path (its query string ignored), matched normalised
        (:func:`normalise_path`). A path matching no route as it stands is tried once more with
        every escape decoded (``/v1/chat%2Fcompletions``: many upstream frameworks route on
        the decoded path; routes whose model sits in the path as ``%2F``, Bedrock's ARNs,
        match the first way)."""
        q = path.find("?")
        if q >= 0:
            path = path[:q]
        return self._resolve(path)

    def _resolve_uncached(self, path: str) -> Match | None:
        path = normalise_path(path)
        match = self._first(path)
        if match is None and "%" in path:
            match = self._first(normalise_path(unquote(path)))
        return match

    def _first(self, path: str) -> Match | None:
        for r in self._routes:
            m = r.pattern.search(path)
            if m is not None:
                model = m.groupdict().get("model")
                return Match(r.parser, r.provider, unquote(model) if model else None)
        return None


@lru_cache(maxsize=1)
def _host_table() -> tuple[tuple[str, str], ...]:
    from extproc import apis

    return tuple((suffix, p.name) for p in apis.all_providers() for suffix in p.hosts)


@lru_cache(maxsize=1024)
def provider_for_host(host: str) -> str | None:
    host = host.lower()
    for suffix, name in _host_table():
        if host.endswith(suffix) or (suffix.startswith(":") and suffix in host):
            return name
    return None


@lru_cache(maxsize=1)
def declared() -> dict[str, Provider]:
    """Our provider name -> its declaration."""
    from extproc import apis

    return {p.name: p for p in apis.all_providers()}


def semconv_name(provider: str) -> str:
    """``gen_ai.provider.name`` for one of our provider names (unknown ones pass through)."""
    known = declared().get(provider)
    return known.semconv if known is not None else provider


@lru_cache(maxsize=1)
def model_makers() -> tuple[tuple[str, Provider], ...]:
    """(model id substring, the provider that makes that model), in module order."""
    from extproc import apis

    return tuple((marker, p) for p in apis.all_providers() for marker in p.model_markers)


def catalogue_ids() -> dict[str, tuple[str, ...]]:
    """Our provider name -> its ``genai-prices`` provider ids (for ``core.pricing.Pricer``)."""
    from extproc import apis

    return {p.name: p.catalogue for p in apis.all_providers() if p.catalogue}


def default_routes() -> list[Route]:
    from extproc import apis

    return apis.all_routes()
