"""What a config means to the servicer, built (and checked) before any of it is used.

One object, swapped whole on a reload (:meth:`Processor.apply`), so a reload applies all of a
config or none of it. It holds the config itself (its sections are read where they are used: a new
limit is a key in :class:`extproc.core.config.LimitsConfig`, read as ``settings.limits.<key>``) and
what has to be built from it once: the router, the pricer, the budget, attribution, the parsers'
limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.apis.base import Limits
from extproc.apis.routing import Route, Router, catalogue_ids, default_routes, route
from extproc.core.attribution import Attribution
from extproc.core.config import Config, ConfigError, LimitsConfig
from extproc.core.pricing import Pricer
from extproc.telemetry import metadata


@dataclass(frozen=True, slots=True)
class Settings:
    config: Config
    limits: LimitsConfig  # config.limits: read a key where it is used
    parser_limits: Limits  # what a parser bounds (limits, tracing.maxContentChars)
    provider_key: str  # providers.header, lower-case as header keys and gRPC metadata keys arrive
    router: Router
    pricer: Pricer
    budget: metadata.Budget | None  # ratelimit_cost per call (budgets.enabled)
    attribution: Attribution


def settings(config: Config) -> Settings:
    """Build the servicer's settings from a config; ConfigError names what is wrong (an unknown
    ``providers.routes[].api``). Pure: no threads, no I/O, safe in the supervising parent."""
    lim = config.limits
    routes = default_routes()
    return Settings(
        config=config,
        limits=lim,
        parser_limits=Limits(
            max_body_bytes=lim.max_body_bytes, max_event_bytes=lim.max_event_bytes, max_capture_chars=config.tracing.max_content_chars
        ),
        provider_key=config.providers.header.lower(),
        router=Router(routes, extra=_config_routes(config, routes)),
        pricer=Pricer(config.pricing, catalogue_ids()),
        budget=metadata.Budget(config.budgets) if config.budgets.enabled else None,
        attribution=Attribution(config.attribution),
    )


def _config_routes(config: Config, routes: list[Route]) -> list[Route]:
    by_api = {r.parser.api: r.parser for r in routes}
    extra = []
    for i, r in enumerate(config.providers.routes):
        parser = by_api.get(r.api)
        if parser is None:
            raise ConfigError(f"providers.routes.{i}.api: unknown api {r.api!r} (known: {', '.join(sorted(by_api))})")
        extra.append(route(r.path_regex, parser, r.provider))
    return extra
