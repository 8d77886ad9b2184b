"""Build Envoy bootstrap configs: the reference one users copy, and the local ones `dev`/tests run.

One builder, so the reference file ``envoy/envoy.yaml`` and what the tests exercise cannot drift
(``tests/e2e/test_envoy_config.py`` checks the committed file equals ``reference()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.core.config import DEFAULT_NAMESPACE

JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
# ext_proc cluster: streams per HTTP/2 connection before Envoy opens another (docs/performance.md).
EXTPROC_STREAMS_PER_CONNECTION = 8

# The access-log fields of the kgateway example, plus model/provider_model/provider.
def access_log_format(namespace: str = DEFAULT_NAMESPACE) -> dict[str, str]:
    ai = lambda key: f"%DYNAMIC_METADATA({namespace}:{key})%"  # noqa: E731
    return {
        "http_method": "%REQ(:METHOD)%",
        # without the query string: Gemini API keys travel as ?key=...
        "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "user": f"%DYNAMIC_METADATA({JWT_NAMESPACE}:principal:sub)%",
        "team": f"%DYNAMIC_METADATA({JWT_NAMESPACE}:principal:team)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "response_code": "%RESPONSE_CODE%",
        "system_time": "%START_TIME%",
        "target_duration": "%DURATION%",
        "upstream_name": "%UPSTREAM_CLUSTER%",
        "total_tokens": ai("total_tokens"),
        "prompt_tokens": ai("prompt_tokens"),
        "completion_tokens": ai("completion_tokens"),
        "cached_tokens": ai("cached_tokens"),
        "reasoning_tokens": ai("reasoning_tokens"),
        "cost_usd": ai("cost_usd"),
        "streaming": ai("streaming"),
        "model": ai("model"),
        "provider_model": ai("provider_model"),
        "provider": ai("provider"),
        "operation": ai("operation"),
        "outcome": ai("outcome"),
    }


@dataclass(frozen=True)
class Upstream:
    """Requests whose path starts with ``prefix`` go to ``url`` (path kept)."""

    prefix: str
    url: str
    provider: str | None = None  # sent to the sidecar as grpc_initial_metadata x-llm-provider

    @property
    def cluster(self) -> str:
        host = urlsplit(self.url).hostname or "upstream"
        return "llm_" + "".join(c if c.isalnum() else "_" for c in host) + f"_{urlsplit(self.url).port or ''}"


@dataclass(frozen=True)
class ExtProcTls:
    """TLS from Envoy to the sidecar (its ``tls`` config section): the ``ext_proc`` cluster's
    ``transport_socket``. ``ca_file`` verifies the sidecar's certificate; ``cert_file``/``key_file``
    are Envoy's client certificate (mTLS, when the sidecar sets ``tls.clientCaFile``); ``sni`` is
    sent and, when set, the sidecar certificate must carry it as a DNS subject alternative name."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    sni: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("ExtProcTls: set both cert_file and key_file, or neither")

    def transport_socket(self) -> dict[str, Any]:
        validation: dict[str, Any] = {"trusted_ca": {"filename": self.ca_file}}
        if self.sni is not None:
            validation["match_typed_subject_alt_names"] = [{"san_type": "DNS", "matcher": {"exact": self.sni}}]
        common: dict[str, Any] = {
            "alpn_protocols": ["h2"],  # gRPC over TLS negotiates HTTP/2 by ALPN
            "validation_context": validation,
        }
        if self.cert_file is not None:
            common["tls_certificates"] = [{
                "certificate_chain": {"filename": self.cert_file},
                "private_key": {"filename": self.key_file},
            }]
        ctx: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common,
        }
        if self.sni is not None:
            ctx["sni"] = self.sni
        return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def _address(addr: str) -> dict[str, Any]:
    if addr.startswith("unix:"):
        return {"pipe": {"path": addr[5:]}}
    host, _, port = addr.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _cluster(up: Upstream) -> dict[str, Any]:
    u = urlsplit(up.url)
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    cluster: dict[str, Any] = {
        "name": up.cluster,
        "type": "STATIC" if _is_ip(u.hostname or "") else "STRICT_DNS",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": up.cluster,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(f"{u.hostname}:{port}")}}]}],
        },
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": u.hostname,
            },
        }
    return cluster


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ext_proc_filter(
    namespace: str = DEFAULT_NAMESPACE,
    message_timeout_ms: int = 500,
    observability_mode: bool = False,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}},
        # Fail open: if the sidecar is down, slow or errors, traffic flows unobserved.
        "failure_mode_allow": True,
        "message_timeout": f"{message_timeout_ms / 1000:g}s",
        # The sidecar picks the response body mode per response (STREAMED for LLM APIs, NONE else).
        "allow_mode_override": True,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            # Up to the buffer limit, then the prefix only: no 413 for large request bodies.
            "request_body_mode": "BUFFERED_PARTIAL",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {
            "forwarding_namespaces": {"untyped": [JWT_NAMESPACE]},
            # Without this Envoy silently drops the metadata the sidecar returns.
            "receiving_namespaces": {"untyped": [namespace]},
        },
    }
    if observability_mode:
        cfg["observability_mode"] = True
        cfg["processing_mode"]["response_body_mode"] = "STREAMED"
        cfg["processing_mode"]["request_body_mode"] = "STREAMED"
        cfg.pop("allow_mode_override")
        cfg.pop("message_timeout")
    return cfg


def jwt_filter(jwks_json: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {
            # Any token signed by a key of the JWKS is accepted, whatever its issuer (no audience
            # check). Its claims land in dynamic metadata under "principal".
            "local": {
                "local_jwks": {"inline_string": jwks_json},
                "forward": True,
                "payload_in_metadata": "principal",
            }
        },
        # Observability must not gate traffic: a request with no token, or a token that fails to
        # verify (e.g. an "sk-..." API key in Authorization), still passes, just with no claims.
        # Only a verified token sets principal.*, so labels cannot be forged.
        "rules": [
            {
                "match": {"prefix": "/"},
                "requires": {"requires_any": {"requirements": [{"provider_name": "local"}, {"allow_missing_or_failed": {}}]}},
            }
        ],
    }


def bootstrap(
    *,
    upstreams: list[Upstream],
    listen: str = "127.0.0.1:10000",
    extproc: str | None = "127.0.0.1:18080",
    jwks_json: str | None = None,
    access_log: str = "/dev/stdout",
    admin: str | None = None,
    ops_listen: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    message_timeout_ms: int = 500,
    observability_mode: bool = False,
    tracing_otlp: str | None = None,
    tracing_service_name: str = "envoy",
    extproc_tls: ExtProcTls | None = None,
    extproc_streams_per_connection: int = EXTPROC_STREAMS_PER_CONNECTION,
) -> dict[str, Any]:
    """A complete Envoy bootstrap. ``extproc=None`` builds the same proxy without the sidecar.

    ``tracing_otlp`` (a collector's ``host:port``, OTLP/gRPC) turns on Envoy's own OpenTelemetry
    tracing: Envoy's spans and the sidecar's then share one trace (the ext_proc stream carries
    Envoy's ``traceparent``, and the sidecar parents its span on it).

    ``ops_listen`` (needs ``admin``) adds a listener exposing only the admin's ``/ready`` and
    ``/stats/prometheus``, so the admin itself (which can stop Envoy) stays on loopback.

    ``extproc_tls`` connects to the sidecar over TLS (mTLS with a client certificate); for a
    sidecar that is not on loopback, with its ``tls`` config section set (docs/security-tls.md).

    ``extproc_streams_per_connection`` caps the ext_proc streams per HTTP/2 connection: lower
    means more connections, spread over more sidecar workers.
    """
    http_filters: list[dict[str, Any]] = []
    if jwks_json is not None:
        http_filters.append({"name": JWT_NAMESPACE, "typed_config": jwt_filter(jwks_json)})
    if extproc is not None:
        http_filters.append(
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc_filter(namespace, message_timeout_ms, observability_mode)}
        )
    http_filters.append(
        {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    )
    routes = []
    for up in upstreams:
        r: dict[str, Any] = {
            "match": {"prefix": up.prefix},
            "route": {"cluster": up.cluster, "timeout": "600s", "auto_host_rewrite": True},
        }
        if up.provider and extproc is not None:
            r["typed_per_filter_config"] = {
                "envoy.filters.http.ext_proc": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "overrides": {"grpc_initial_metadata": [{"key": "x-llm-provider", "value": up.provider}]},
                }
            }
        routes.append(r)
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm",
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log,
                    "log_format": {
                        "json_format": access_log_format(namespace),
                        "formatters": [{
                            "name": "envoy.formatter.req_without_query",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"},
                        }],
                    },
                },
            }
        ],
        "route_config": {"name": "llm", "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}]},
        "http_filters": http_filters,
    }
    if tracing_otlp is not None:
        hcm["tracing"] = envoy_tracing(tracing_service_name)
    clusters: dict[str, dict[str, Any]] = {}
    for up in upstreams:
        clusters.setdefault(up.cluster, _cluster(up))
    if extproc is not None:
        by_name = not extproc.startswith("unix:") and not _is_ip(extproc.rpartition(":")[0].strip("[]"))
        clusters["ext_proc"] = {
            "name": "ext_proc",
            # A service name (docker compose: extproc:18080) is resolved, and re-resolved, by DNS.
            "type": "STRICT_DNS" if by_name else "STATIC",
            **({"dns_lookup_family": "V4_PREFERRED"} if by_name else {}),
            "connect_timeout": "1s",
            # ext_proc is gRPC: the cluster must speak HTTP/2.
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    # At most this many streams per HTTP/2 connection: under load Envoy opens more
                    # connections (not just one per worker thread), so the kernel's SO_REUSEPORT
                    # hashing spreads them over every sidecar worker process.
                    "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": extproc_streams_per_connection}},
                }
            },
            # Every in-flight LLM call holds one stream: raise the default 1024 limits.
            "circuit_breakers": {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000, "max_connections": 1000}]},
            "load_assignment": {"cluster_name": "ext_proc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(extproc)}}]}]},
        }
        if extproc_tls is not None:
            clusters["ext_proc"]["transport_socket"] = extproc_tls.transport_socket()
    if tracing_otlp is not None:
        clusters["otel_collector"] = _grpc_cluster("otel_collector", tracing_otlp)
    listeners: list[dict[str, Any]] = []
    if ops_listen is not None:
        if admin is None:
            raise ValueError("ops_listen needs an admin address")
        listeners.append(_ops_listener(ops_listen))
        clusters["envoy_admin"] = {
            "name": "envoy_admin",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(admin)}}]}]},
        }
    cfg: dict[str, Any] = {
        "static_resources": {
            "listeners": [
                {
                    "name": "llm",
                    "address": _address(listen),
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ] + listeners,
            "clusters": list(clusters.values()),
        }
    }
    if admin is not None:
        cfg["admin"] = {"address": _address(admin)}
    return cfg


def envoy_tracing(service_name: str = "envoy") -> dict[str, Any]:
    """HCM ``tracing``: Envoy's OpenTelemetry tracer, exporting to the ``otel_collector`` cluster."""
    return {
        "random_sampling": {"value": 100},  # an incoming traceparent's sampled flag still decides
        "spawn_upstream_span": True,
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "1s"},
                "service_name": service_name,
            },
        },
    }


def _grpc_cluster(name: str, address: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC" if _is_ip(address.rpartition(":")[0].strip("[]")) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(address)}}]}]},
    }


def _ops_listener(addr: str) -> dict[str, Any]:
    """Readiness and Prometheus stats for kubelet/Prometheus, proxied to the loopback admin."""
    routes = [
        {"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
         "route": {"cluster": "envoy_admin"}}
        for path in ("/ready", "/stats/prometheus")
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ops",
        "route_config": {"name": "ops", "virtual_hosts": [{"name": "ops", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
        ],
    }
    return {
        "name": "ops",
        "address": _address(addr),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


# An example JWKS (public key only) so the reference config validates; replace it with yours.
EXAMPLE_JWKS = (
    '{"keys":[{"kty":"RSA","kid":"example","alg":"RS256","use":"sig","e":"AQAB",'
    '"n":"u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw"}]}'
)


# Envoy in front of OpenAI and Anthropic, the sidecar beside it on loopback.
_REFERENCE: dict[str, Any] = {
    "listen": "0.0.0.0:10000",
    "upstreams": [
        Upstream("/v1/messages", "https://api.anthropic.com", "anthropic"),
        Upstream("/", "https://api.openai.com", "openai"),
    ],
    "extproc": "127.0.0.1:18080",
    "jwks_json": EXAMPLE_JWKS,
    "access_log": "/dev/stdout",
    "admin": "127.0.0.1:9901",
}


def reference() -> dict[str, Any]:
    """envoy/envoy.yaml: the config users copy."""
    return bootstrap(**_REFERENCE)


def compose() -> dict[str, Any]:
    """envoy/envoy-compose.yaml: docker-compose.yaml's Envoy; peers are reached by service name."""
    return bootstrap(
        listen="0.0.0.0:10000",
        upstreams=[Upstream("/", "http://mock-llm:8000", "openai")],
        extproc="extproc:18080",  # deploy/compose/extproc.yaml listens on 0.0.0.0:18080
        access_log="/dev/stdout",  # `docker compose logs envoy`
        admin="0.0.0.0:9901",  # Prometheus scrapes /stats/prometheus; published on host loopback only
    )


def kubernetes() -> dict[str, Any]:
    """deploy/kubernetes/envoy.yaml: the reference, plus the ops listener the pod's probes use."""
    return bootstrap(**_REFERENCE, ops_listen="0.0.0.0:9902")  # readinessProbe /ready and the PodMonitor


HEADER = """\
# Reference Envoy config for envoy-ai-extproc. Generated by `make envoy-config` from
# extproc/devtools/envoy_config.py (tests fail if it drifts). Copy it and adapt: upstream clusters, the
# JWKS, the access-log path. The pieces that matter for the sidecar are commented in the builder:
# ext_proc's failure_mode_allow, allow_mode_override, metadata_options, and the HTTP/2 ext_proc cluster.
"""


def dump(cfg: dict[str, Any], header: str = "") -> str:
    return header + yaml.safe_dump(cfg, sort_keys=False, width=120)


COMPOSE_HEADER = """\
# Envoy config of docker-compose.yaml. Generated by `make envoy-config` from
# extproc/devtools/envoy_config.py:compose() (tests fail if it drifts). Service names: extproc, mock-llm.
"""

KUBERNETES_HEADER = """\
# Envoy config of deploy/kubernetes (a ConfigMap via kustomize's configMapGenerator). Generated by
# `make envoy-config` from extproc/devtools/envoy_config.py:kubernetes() (tests fail if it drifts). Replace
# the example JWKS and the upstreams with yours. Admin stays on loopback; port 9902 serves only
# /ready and /stats/prometheus.
"""

# Generated files: path in the repo -> (builder, header). `extproc envoy-config --variant NAME`.
VARIANTS = {
    "reference": ("envoy/envoy.yaml", reference, HEADER),
    "compose": ("envoy/envoy-compose.yaml", compose, COMPOSE_HEADER),
    "kubernetes": ("deploy/kubernetes/envoy.yaml", kubernetes, KUBERNETES_HEADER),
}


def render(variant: str) -> str:
    _, build, header = VARIANTS[variant]
    return dump(build(), header)
