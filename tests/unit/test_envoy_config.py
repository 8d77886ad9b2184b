"""The generated Envoy config's routes: passthrough routes bypass the sidecar, the others do not.

(``envoy --mode validate`` of these configs: tests/e2e/test_envoy_config.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from extproc import cli
from extproc.devtools import envoy_config
from extproc.devtools.envoy_config import Upstream

EXT_PROC = "envoy.filters.http.ext_proc"
DISABLED = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
UPSTREAMS = [
    Upstream("/v1/messages", "https://api.anthropic.com", "anthropic", http2=True),
    Upstream("/", "https://api.openai.com", "openai", http2=True),
]


def routes(cfg: Any) -> list[dict[str, Any]]:
    listener = envoy_config.to_dict(cfg)["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


def table(cfg: Any) -> list[tuple[str, str, bool]]:
    """(prefix, cluster, ext_proc disabled) per route, in match order."""
    return [
        (r["match"]["prefix"], r["route"]["cluster"], r.get("typed_per_filter_config", {}).get(EXT_PROC) == DISABLED) for r in routes(cfg)
    ]


@pytest.mark.parametrize("fewer_messages", [False, True])
def test_passthrough_prefix_disables_ext_proc_on_its_route_only(fewer_messages):
    cfg = envoy_config.bootstrap(upstreams=UPSTREAMS, passthrough=("/v1/files", "/v1/messages/count_tokens"), fewer_messages=fewer_messages)
    anthropic, openai = UPSTREAMS[0].cluster, UPSTREAMS[1].cluster
    # Each passthrough route sits just before the route it carves from and keeps its upstream.
    assert table(cfg) == [
        ("/v1/messages/count_tokens", anthropic, True),
        ("/v1/messages", anthropic, False),
        ("/v1/files", openai, True),
        ("/", openai, False),
    ]
    rs = routes(cfg)
    assert rs[0]["typed_per_filter_config"] == {EXT_PROC: DISABLED}  # no provider override either
    assert rs[1]["typed_per_filter_config"][EXT_PROC]["overrides"]["grpc_initial_metadata"] == [
        {"key": "x-llm-provider", "value": "anthropic"}
    ]
    # The filter itself stays in the chain, under the name the per-route configs use.
    listener = envoy_config.to_dict(cfg)["static_resources"]["listeners"][0]
    filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert EXT_PROC in [f["name"] for f in filters]
    # Same upstream, same cluster: no duplicate clusters.
    names = [c["name"] for c in envoy_config.to_dict(cfg)["static_resources"]["clusters"]]
    assert len(names) == len(set(names)) and {anthropic, openai} <= set(names)


def test_no_passthrough_no_disabled_route():
    assert not any(disabled for _, _, disabled in table(envoy_config.bootstrap(upstreams=UPSTREAMS)))


def test_upstream_observe_false():
    cfg = envoy_config.bootstrap(
        upstreams=[Upstream("/health", "http://127.0.0.1:8001", observe=False), Upstream("/", "http://127.0.0.1:8000")]
    )
    assert [(p, d) for p, _, d in table(cfg)] == [("/health", True), ("/", False)]


def test_passthrough_of_a_whole_route_replaces_it():
    cfg = envoy_config.bootstrap(upstreams=UPSTREAMS, passthrough=("/v1/messages",))
    assert table(cfg) == [("/v1/messages", UPSTREAMS[0].cluster, True), ("/", UPSTREAMS[1].cluster, False)]


def test_passthrough_matching_no_route_is_an_error():
    with pytest.raises(ValueError, match="/health"):
        envoy_config.bootstrap(upstreams=[Upstream("/v1/", "http://127.0.0.1:8000")], passthrough=("/v1/models", "/health"))


def test_passthrough_routes_are_not_rate_limited():
    """The sidecar computes the cost a budget is charged; it never sees a passthrough route."""
    cfg = envoy_config.bootstrap(upstreams=UPSTREAMS, passthrough=("/v1/files",), ratelimit=envoy_config.RateLimitService("127.0.0.1:8081"))
    per_route = {r["match"]["prefix"]: r.get("typed_per_filter_config", {}) for r in routes(cfg)}
    assert "envoy.filters.http.ratelimit" not in per_route["/v1/files"]
    assert "envoy.filters.http.ratelimit" in per_route["/"]


def test_without_the_sidecar_no_ext_proc_route_config():
    cfg = envoy_config.bootstrap(upstreams=UPSTREAMS, passthrough=("/v1/files",), extproc=None)
    assert all(EXT_PROC not in r.get("typed_per_filter_config", {}) for r in routes(cfg))


def test_cli_passthrough(capsys):
    assert cli.main(["envoy-config", "--mode", "fewer-messages", "--passthrough", "/v1/files", "--passthrough", "/v1/models"]) == 0
    out = capsys.readouterr().out
    assert "# not observed (`--passthrough`): paths starting with /v1/files, /v1/models" in out
    assert out.count("disabled: true") == 2
    assert cli.main(["envoy-config"]) == 0
    assert "disabled: true" not in capsys.readouterr().out


def test_cli_passthrough_rejects_a_non_path(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["envoy-config", "--passthrough", "v1/files"])
    assert e.value.code == 2 and "starting with /" in capsys.readouterr().err


@pytest.mark.parametrize("fewer_messages", [False, True])
def test_route_without_request_body_overrides_only_the_request_body_mode(fewer_messages):
    gemini = Upstream("/v1beta/models/", "https://generativelanguage.googleapis.com", "gemini", request_body=False)
    cfg = envoy_config.bootstrap(upstreams=[gemini, *UPSTREAMS], fewer_messages=fewer_messages)
    listener = envoy_config.to_dict(cfg)["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filter_mode = next(f for f in hcm["http_filters"] if f["name"] == EXT_PROC)["typed_config"]["processing_mode"]
    assert filter_mode["request_body_mode"] == "STREAMED"  # the filter's own mode is untouched
    rs = routes(cfg)
    overrides = rs[0]["typed_per_filter_config"][EXT_PROC]["overrides"]
    # Envoy replaces the filter's whole processing_mode with the route's: all else is copied.
    assert overrides["processing_mode"] == {k: v for k, v in filter_mode.items() if k != "request_body_mode"}  # NONE
    assert overrides["grpc_initial_metadata"] == [{"key": "x-llm-provider", "value": "gemini"}]
    assert all("processing_mode" not in r["typed_per_filter_config"][EXT_PROC]["overrides"] for r in rs[1:])


def _ext_proc_limits(cfg: Any) -> dict[str, Any]:
    clusters = envoy_config.to_dict(cfg)["static_resources"]["clusters"]
    [ext] = [c for c in clusters if c["name"] == "ext_proc"]
    [limits] = ext["circuit_breakers"]["thresholds"]
    return limits


def test_observability_mode_bounds_the_streams_envoy_opens_to_the_sidecar():
    """Envoy never waits for the sidecar in observability mode: past 128 connections x 8 streams
    (and 1,024 queued) it sheds a call's observation at once instead of piling connections up
    in the sidecar. The default mode keeps room for every in-flight call (it waits for replies)."""
    observe = _ext_proc_limits(envoy_config.bootstrap(upstreams=UPSTREAMS, observability_mode=True))
    assert (
        (observe["max_connections"], observe["max_requests"], observe["max_pending_requests"])
        == (
            envoy_config.OBSERVE_MAX_CONNECTIONS,
            envoy_config.OBSERVE_MAX_CONNECTIONS * envoy_config.EXTPROC_STREAMS_PER_CONNECTION,
            envoy_config.OBSERVE_MAX_PENDING,
        )
        == (128, 1024, 1024)
    )
    inline = _ext_proc_limits(envoy_config.bootstrap(upstreams=UPSTREAMS))
    assert (inline["max_connections"], inline["max_requests"], inline["max_pending_requests"]) == (1000, 100000, 100000)
    chosen = _ext_proc_limits(envoy_config.bootstrap(upstreams=UPSTREAMS, observability_mode=True, extproc_max_connections=32))
    assert (chosen["max_connections"], chosen["max_requests"]) == (32, 256)


def test_observability_mode_with_fewer_messages_streams_both_bodies_and_skips_headers():
    """Observability mode sends bodies only in STREAMED mode (Envoy ignores BUFFERED_PARTIAL there and
    sends nothing), so the combination keeps the request body STREAMED; the request line rides on
    its first message as attributes."""
    cfg = envoy_config.to_dict(envoy_config.bootstrap(upstreams=UPSTREAMS, observability_mode=True, fewer_messages=True))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [ep] = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == EXT_PROC]
    mode = ep["processing_mode"]
    assert ep["observability_mode"] is True
    assert (mode["request_header_mode"], mode["response_header_mode"]) == ("SKIP", "SKIP")
    assert (mode["request_body_mode"], mode["response_body_mode"]) == ("STREAMED", "STREAMED")
    assert "request.path" in ep["request_attributes"] and "response.code" in ep["response_attributes"]


def filter_names(cfg: Any) -> list[str]:
    listener = envoy_config.to_dict(cfg)["static_resources"]["listeners"][0]
    return [f["name"] for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]


@pytest.mark.parametrize(
    ("fewer_messages", "order"),
    [
        (False, ["envoy.filters.http.jwt_authn", "envoy.filters.http.ratelimit", EXT_PROC, "envoy.filters.http.router"]),
        (
            True,
            [
                "envoy.filters.http.jwt_authn",
                "envoy.filters.http.ratelimit",
                EXT_PROC,
                "envoy.filters.http.header_to_metadata",
                "envoy.filters.http.router",
            ],
        ),
    ],
)
def test_the_rate_limit_filter_precedes_ext_proc(fewer_messages, order):
    """ext_proc streams the request body (and lets the headers through while it holds a chunk): a
    limiter after it would end the request with part of the body (tests/e2e/test_budgets.py
    checks the bytes the upstream receives)."""
    cfg = envoy_config.bootstrap(
        upstreams=UPSTREAMS,
        jwks_json=envoy_config.EXAMPLE_JWKS,
        fewer_messages=fewer_messages,
        ratelimit=envoy_config.RateLimitService("127.0.0.1:8081"),
    )
    assert filter_names(cfg) == order


@pytest.mark.parametrize("variant", sorted(envoy_config.VARIANTS))
def test_envoy_normalises_paths_before_any_filter_or_route(variant):
    """``/v1/chat/%63ompletions``, ``//v1//embeddings``, ``/v1/x/../embeddings`` reach the sidecar and
    the routes as the path the upstream serves (the e2e budgets test checks they are charged)."""
    _, build, _ = envoy_config.VARIANTS[variant]
    listener = envoy_config.to_dict(build())["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "KEEP_UNCHANGED"  # %2F in model ids (Bedrock ARNs)


def _ext_proc_http_options(cfg: Any) -> dict[str, Any]:
    clusters = envoy_config.to_dict(cfg)["static_resources"]["clusters"]
    [ext] = [c for c in clusters if c["name"] == "ext_proc"]
    return ext["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]


@pytest.mark.parametrize("observability_mode", [False, True])
def test_envoy_recycles_ext_proc_connections_so_every_sidecar_worker_gets_a_share(observability_mode):
    """SO_REUSEPORT hashes each connection to one sidecar worker once; HTTP/2 connections live
    forever, so connections that all landed on one worker (a restarted worker misses the
    reconnections) would stay there. Closing each after 1,000 streams re-spreads them."""
    options = _ext_proc_http_options(envoy_config.bootstrap(upstreams=UPSTREAMS, observability_mode=observability_mode))
    assert options["common_http_protocol_options"]["max_requests_per_connection"] == 1000
    assert options["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] == 8
    never = _ext_proc_http_options(envoy_config.bootstrap(upstreams=UPSTREAMS, extproc_max_requests_per_connection=None))
    assert "common_http_protocol_options" not in never
    reference = _ext_proc_http_options(envoy_config.reference())
    assert reference["common_http_protocol_options"]["max_requests_per_connection"] == 1000
