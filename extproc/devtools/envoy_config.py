"""Build Envoy bootstrap configs: the reference one users copy, and the local ones `dev`/tests run.

One builder, so the reference file ``envoy/envoy.yaml`` and what the tests exercise cannot drift
(``tests/e2e/test_envoy_config.py`` checks the committed file equals ``reference()``).

Every piece is a typed message of ``envoy-data-plane`` (``envoy_data_plane.*``: a Python class per
Envoy API message), so a misspelt field fails here rather than when Envoy loads the file, and each
``typed_config``'s ``@type`` comes from ``Any.pack(message)``. Importing those classes takes about a
second: only config generation imports this module (``extproc dev``, ``extproc envoy-config``, the
tests); ``extproc serve`` never does (``tests/unit/test_layers.py`` checks), and the sidecar image
does not install the library (it is in the ``dev`` extra).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import betterproto2
import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    Pipe,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CommonHttpProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.ratelimit.v3 import RateLimitServiceConfig
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RateLimit,
    RateLimitAction,
    RateLimitActionMetaData,
    RateLimitActionMetaDataSource,
    RateLimitActionRequestHeaders,
    RateLimitHitsAddend,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.header_to_metadata.v3 import Config as HeaderToMetadata
from envoy_data_plane.envoy.extensions.filters.http.header_to_metadata.v3 import (
    ConfigKeyValuePair,
    ConfigRule,
    ConfigValueType,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.ratelimit.v3 import RateLimit as RateLimitFilter
from envoy_data_plane.envoy.extensions.filters.http.ratelimit.v3 import RateLimitPerRoute, RateLimitXRateLimitHeadersRfcVersion
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.formatter.req_without_query.v3 import ReqWithoutQuery
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsAutoHttpConfig,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.envoy.type.metadata.v3 import MetadataKey, MetadataKeyPathSegment
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Empty, Struct

from extproc.core.config import DEFAULT_NAMESPACE, DEFAULT_NO_CAPTURE_HEADER, DEFAULT_PROVIDER_HEADER, BudgetEntry, BudgetsConfig
from extproc.core.envoy_names import (
    BUFFER_FILTER,
    EXT_PROC_FILTER,
    FILE_ACCESS_LOG,
    HEADER_TO_METADATA_FILTER,
    HTTP_CONNECTION_MANAGER,
    HTTP_PROTOCOL_OPTIONS,
    JWT_AUTHN_FILTER,
    JWT_AUTHN_NAMESPACE,
    JWT_PAYLOAD_KEY,
    OPENTELEMETRY_TRACER,
    RATELIMIT_FILTER,
    REQ_WITHOUT_QUERY_FORMATTER,
    RESPONSE_HEADERS_NAMESPACE,
    ROUTER_FILTER,
    TLS_TRANSPORT_SOCKET,
)
from extproc.devtools.modes import DEFAULT as DEFAULT_MODE
from extproc.devtools.modes import MODES, Mode

RATELIMIT_COST_KEY = "ratelimit_cost"  # the sidecar's dynamic metadata key (docs/budgets.md)
# ext_proc cluster: streams per HTTP/2 connection before Envoy opens another (docs/performance.md).
EXTPROC_STREAMS_PER_CONNECTION = 8
# ext_proc cluster: Envoy closes a connection after this many streams and opens a new one, which
# the kernel hashes to a sidecar worker afresh: connections that all landed on one worker (a worker
# restarted, or listening late, misses the reconnections) spread again within seconds under load.
# One new HTTP/2 connection per 1,000 calls costs nothing measurable (docs/performance.md).
EXTPROC_MAX_REQUESTS_PER_CONNECTION = 1000
# Observability mode: connections to the sidecar (x streams per connection = streams in flight),
# and ext_proc streams Envoy may queue for a connection; past them Envoy sheds the call's
# observation at once (docs/operations.md, "Overload").
OBSERVE_MAX_CONNECTIONS = 128
OBSERVE_MAX_PENDING = 1024


def pack(message: betterproto2.Message) -> AnyMessage:
    """A ``typed_config``: the message with its ``@type`` URL."""
    return AnyMessage.pack(message)


def to_dict(message: betterproto2.Message) -> dict[str, Any]:
    """Envoy-ready JSON/YAML: field names as in Envoy's docs (snake_case), defaults omitted."""
    return message.to_dict(casing=betterproto2.Casing.SNAKE)


# The access-log fields of the kgateway example, plus model/provider_model/provider, how the call
# ended, stream timings and attribution (end user, session, API-key id).
def access_log_format(namespace: str = DEFAULT_NAMESPACE, budgets: bool = False) -> dict[str, str]:
    ai = lambda key: f"%DYNAMIC_METADATA({namespace}:{key})%"  # noqa: E731
    fmt = {
        "http_method": "%REQ(:METHOD)%",
        # without the query string: Gemini API keys travel as ?key=...
        "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "user": f"%DYNAMIC_METADATA({JWT_AUTHN_NAMESPACE}:{JWT_PAYLOAD_KEY}:sub)%",
        "team": f"%DYNAMIC_METADATA({JWT_AUTHN_NAMESPACE}:{JWT_PAYLOAD_KEY}:team)%",
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
        "finish_reason": ai("finish_reason"),
        "ttft_ms": ai("ttft_ms"),
        "tpot_ms": ai("tpot_ms"),
        "end_user": ai("end_user"),
        "session_id": ai("session_id"),
        "key_id": ai("key_id"),
    }
    if budgets:
        fmt["ratelimit_cost"] = ai(RATELIMIT_COST_KEY)  # what the call was charged
        fmt["response_flags"] = "%RESPONSE_FLAGS%"  # RL: rejected by the rate limit service
    return fmt


@dataclass(frozen=True)
class Upstream:
    """Requests whose path starts with ``prefix`` go to ``url`` (path kept)."""

    prefix: str
    url: str
    provider: str | None = None  # sent to the sidecar as grpc_initial_metadata x-llm-provider
    # HTTP/2 to the upstream: negotiated by ALPN over TLS (falling back to HTTP/1.1), prior
    # knowledge in cleartext. A non-streamed response then reaches ext_proc as one body message
    # (HTTP/1.1: the data, then an empty end of stream). All major LLM APIs speak it.
    http2: bool = False
    # False: the route bypasses the sidecar (ExtProcPerRoute {disabled: true}): no ext_proc message,
    # no metadata, no budget check. For non-LLM paths (bootstrap's ``passthrough``).
    observe: bool = True
    # False: the sidecar gets no request body on this route (per-route processing_mode with
    # request_body_mode NONE): one ext_proc message fewer per call, for routes whose model is in
    # the path (Gemini's :generateContent, Bedrock, Azure deployments). Lost: whatever comes from
    # the request body (prompt capture, request parameters such as max tokens, a body's model).
    request_body: bool = True

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

    def transport_socket(self) -> TransportSocket:
        validation = CertificateValidationContext(trusted_ca=DataSource(filename=self.ca_file))
        if self.sni is not None:
            validation.match_typed_subject_alt_names = [
                SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.DNS, matcher=StringMatcher(exact=self.sni))
            ]
        common = CommonTlsContext(
            alpn_protocols=["h2"],  # gRPC over TLS negotiates HTTP/2 by ALPN
            validation_context=validation,
        )
        if self.cert_file is not None:
            common.tls_certificates = [
                TlsCertificate(
                    certificate_chain=DataSource(filename=self.cert_file),
                    private_key=DataSource(filename=self.key_file),
                )
            ]
        ctx = UpstreamTlsContext(common_tls_context=common, sni=self.sni or "")
        return TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(ctx))


@dataclass(frozen=True)
class RateLimitService:
    """Envoy's global rate limit filter enforcing token or dollar budgets (docs/budgets.md).

    ``address`` is the rate limit service (gRPC ``envoy.service.ratelimit.v3``, e.g.
    envoyproxy/ratelimit); ``budgets`` the sidecar config's ``budgets`` section, which names the
    domain, the descriptors and the failure mode. Per route, each descriptor is checked with zero
    hits when the request arrives (over budget: 429 before the upstream is called) and charged
    the sidecar's ``ratelimit_cost`` when the stream is done."""

    address: str
    budgets: BudgetsConfig = BudgetsConfig()


def with_passthrough(upstreams: list[Upstream], prefixes: tuple[str, ...] | list[str]) -> list[Upstream]:
    """The routes with each passthrough prefix added as an ``observe=False`` route.

    A request whose path starts with one of ``prefixes`` goes to the upstream it went to before,
    but bypasses the sidecar: the new route sits just before the first route matching the prefix
    (or replaces it, for the same prefix), so routes listed earlier still win."""
    placed: set[str] = set()
    out: list[Upstream] = []
    for up in upstreams:
        mine = [p for p in prefixes if p not in placed and p.startswith(up.prefix)]
        placed.update(mine)
        out.extend(dataclasses.replace(up, prefix=p, observe=False) for p in sorted(mine, key=len, reverse=True))
        if up.prefix not in mine:
            out.append(up)
    if missing := [p for p in prefixes if p not in placed]:
        raise ValueError(f"passthrough prefixes matching no upstream route: {', '.join(missing)}")
    return out


def _address(addr: str) -> Address:
    if addr.startswith("unix:"):
        return Address(pipe=Pipe(path=addr[5:]))
    host, _, port = addr.rpartition(":")
    return Address(socket_address=SocketAddress(address=host.strip("[]"), port_value=int(port)))


def _load_assignment(name: str, addr: str) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(addr)))])],
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(up: Upstream) -> Cluster:
    u = urlsplit(up.url)
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    cluster = Cluster(
        name=up.cluster,
        type=ClusterDiscoveryType.STATIC if _is_ip(u.hostname or "") else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=timedelta(seconds=5),
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        load_assignment=_load_assignment(up.cluster, f"{u.hostname}:{port}"),
    )
    if tls:
        cluster.transport_socket = TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(UpstreamTlsContext(sni=u.hostname or "")))
    if up.http2:
        options = (
            HttpProtocolOptions(
                auto_config=HttpProtocolOptionsAutoHttpConfig(
                    http_protocol_options=Http1ProtocolOptions(), http2_protocol_options=Http2ProtocolOptions()
                )
            )
            if tls
            else HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
            )
        )
        cluster.typed_extension_protocol_options = {HTTP_PROTOCOL_OPTIONS: pack(options)}
    return cluster


def _grpc_cluster(
    name: str, address: str, max_concurrent_streams: int | None = None, max_requests_per_connection: int | None = None
) -> Cluster:
    """A cluster speaking HTTP/2 (gRPC). A service name (docker compose: extproc:18080) is
    resolved, and re-resolved, by DNS; an IP or a unix socket is static. ``max_requests_per_connection``
    (gRPC streams) makes Envoy close a connection after that many and open a new one."""
    by_name = not address.startswith("unix:") and not _is_ip(address.rpartition(":")[0].strip("[]"))
    http2 = Http2ProtocolOptions()
    if max_concurrent_streams is not None:
        http2.max_concurrent_streams = max_concurrent_streams
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS if by_name else ClusterDiscoveryType.STATIC,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED if by_name else ClusterDnsLookupFamily.AUTO,
        connect_timeout=timedelta(seconds=1),
        typed_extension_protocol_options={
            HTTP_PROTOCOL_OPTIONS: pack(
                HttpProtocolOptions(
                    common_http_protocol_options=(
                        CommonHttpProtocolOptions(max_requests_per_connection=max_requests_per_connection)
                        if max_requests_per_connection
                        else None
                    ),
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=http2),
                )
            )
        },
        load_assignment=_load_assignment(name, address),
    )


def ext_proc_filter(
    namespace: str = DEFAULT_NAMESPACE,
    message_timeout_ms: int = 500,
    observability_mode: bool = False,
) -> ExternalProcessor:
    send, skip = ProcessingModeHeaderSendMode.SEND, ProcessingModeHeaderSendMode.SKIP
    cfg = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="ext_proc")),
        # Fail open: if the sidecar is down, slow or errors, traffic flows unobserved.
        failure_mode_allow=True,
        message_timeout=timedelta(milliseconds=message_timeout_ms),
        # The sidecar picks the response body mode per response (STREAMED for LLM APIs, NONE else).
        allow_mode_override=True,
        processing_mode=ProcessingMode(
            request_header_mode=send,
            response_header_mode=send,
            # Chunk by chunk, as Envoy reads it (the sidecar joins the chunks, up to
            # limits.maxBodyBytes): no 413 for large bodies, and no body held in Envoy. Not
            # BUFFERED_PARTIAL: there Envoy 1.40 loses the end of a request body over its buffer
            # limit whose last (empty, end-of-stream) chunk arrives while the sidecar is reading
            # the first 1 MiB, and the upstream waits for the rest forever (docs/envoy.md).
            request_body_mode=ProcessingModeBodySendMode.STREAMED,
            response_body_mode=ProcessingModeBodySendMode.NONE,  # the default, so not written out
            request_trailer_mode=skip,
            response_trailer_mode=skip,
        ),
        metadata_options=MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[JWT_AUTHN_NAMESPACE]),
            # Without this Envoy silently drops the metadata the sidecar returns.
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[namespace]),
        ),
    )
    if observability_mode:
        cfg.observability_mode = True
        assert cfg.processing_mode is not None
        cfg.processing_mode.response_body_mode = ProcessingModeBodySendMode.STREAMED
        cfg.allow_mode_override = False
        cfg.message_timeout = None
    return cfg


# ---- fewer-messages mode (docs/performance.md) ----------------------------------------------------
# No headers messages: the request line and a few request headers arrive as attributes on the
# first request-body message; the status, and the content type/encoding/length (copied into metadata by
# a header_to_metadata filter after ext_proc, which sees the response first), on the first
# response-body message. 3 ext_proc messages per non-streamed call (an HTTP/1.1 client's request
# body: its data, then an empty end of stream) from an HTTP/2 upstream, 4 from
# HTTP/1.1, instead of 4-6.
RESPONSE_HEADERS = ("content-type", "content-encoding", "content-length")
# Request headers the sidecar reads (provider override, trace context, MCP session, the default
# attribution.sessionHeaders, the default tracing.noCaptureHeader). Not the API-key headers: key_id
# needs them added (docs/performance.md).
ATTRIBUTE_HEADERS = (
    DEFAULT_PROVIDER_HEADER,
    "traceparent",
    "tracestate",
    "mcp-session-id",
    "mcp-protocol-version",
    "x-session-id",
    "agent-session-id",
    DEFAULT_NO_CAPTURE_HEADER,
)
_REQUEST_LINE = ["request.path", "request.host", "request.method"]


def fewer_messages_mode(cfg: ExternalProcessor, headers: tuple[str, ...] = ATTRIBUTE_HEADERS) -> None:
    """Turn an ext_proc filter config (from :func:`ext_proc_filter`) into fewer-messages mode."""
    assert cfg.processing_mode is not None
    cfg.allow_mode_override = False  # Envoy ignores mode_override on body replies
    cfg.processing_mode.request_header_mode = ProcessingModeHeaderSendMode.SKIP
    cfg.processing_mode.response_header_mode = ProcessingModeHeaderSendMode.SKIP
    cfg.processing_mode.response_body_mode = ProcessingModeBodySendMode.STREAMED
    cfg.request_attributes = _REQUEST_LINE + [f'request.headers["{h}"]' for h in headers]
    # A GET (no request body) sends no request message: the request line comes with the response.
    cfg.response_attributes = ["response.code", *_REQUEST_LINE] + [
        f'metadata.filter_metadata["{RESPONSE_HEADERS_NAMESPACE}"]["{h}"]' for h in RESPONSE_HEADERS
    ]


def response_headers_filter() -> HttpFilter:
    """header_to_metadata, placed after ext_proc: copies the response headers the sidecar needs
    where the fewer-messages ext_proc reads them as attributes."""
    rules = [
        ConfigRule(
            header=h,
            on_header_present=ConfigKeyValuePair(metadata_namespace=RESPONSE_HEADERS_NAMESPACE, key=h, type=ConfigValueType.STRING),
        )
        for h in RESPONSE_HEADERS
    ]
    return HttpFilter(name=HEADER_TO_METADATA_FILTER, typed_config=pack(HeaderToMetadata(response_rules=rules)))


def jwt_filter(jwks_json: str) -> JwtAuthentication:
    return JwtAuthentication(
        providers={
            # Any token signed by a key of the JWKS is accepted, whatever its issuer (no audience
            # check). Its claims land in dynamic metadata under "principal".
            "local": JwtProvider(
                local_jwks=DataSource(inline_string=jwks_json),
                forward=True,
                payload_in_metadata=JWT_PAYLOAD_KEY,
            )
        },
        # Observability must not gate traffic: a request with no token, or a token that fails to
        # verify (e.g. an "sk-..." API key in Authorization), still passes, just with no claims.
        # Only a verified token sets principal.*, so labels cannot be forged.
        rules=[
            RequirementRule(
                match=RouteMatch(prefix="/"),
                requires=JwtRequirement(
                    requires_any=JwtRequirementOrList(
                        requirements=[
                            JwtRequirement(provider_name="local"),
                            JwtRequirement(allow_missing_or_failed=Empty()),
                        ]
                    )
                ),
            )
        ],
    )


def ratelimit_filter(rls: RateLimitService) -> RateLimitFilter:
    """The global rate limit filter: asks ``rls.address`` (cluster ``ratelimit``) per request.
    Which descriptors it sends is set per route (``ratelimit_per_route``)."""
    b = rls.budgets
    return RateLimitFilter(
        domain=b.domain,
        timeout=timedelta(milliseconds=b.timeout_ms),
        # false: when the service is down or slow, requests pass (and that call goes uncharged).
        failure_mode_deny=b.failure_mode_deny,
        # X-RateLimit-Limit/-Remaining/-Reset on responses: clients see their budget.
        enable_x_ratelimit_headers=RateLimitXRateLimitHeadersRfcVersion.DRAFT_VERSION_03
        if b.x_ratelimit_headers
        else RateLimitXRateLimitHeadersRfcVersion.OFF,
        rate_limit_service=RateLimitServiceConfig(
            grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="ratelimit")),
            transport_api_version=ApiVersion.V3,
        ),
    )


def ratelimit_per_route(rls: RateLimitService, namespace: str = DEFAULT_NAMESPACE) -> RateLimitPerRoute:
    """Per descriptor, two entries (the mechanism Envoy AI Gateway uses for token limits):

    - on the request, ``hits_addend: 0``: only asks whether the budget is already spent (429 if so);
    - on stream done (``apply_on_stream_done``), ``hits_addend.format`` reads the sidecar's
      ``ratelimit_cost`` from dynamic metadata: the call is charged exactly what it used.

    ``hits_addend`` is honoured only in a route's ``typed_per_filter_config`` (RateLimitPerRoute),
    not in the route's own ``rate_limits``: hence this per-route config."""
    limits: list[RateLimit] = []
    for d in rls.budgets.descriptors:
        actions = [_descriptor_action(e) for e in d.entries]
        limits.append(RateLimit(actions=actions, hits_addend=RateLimitHitsAddend(number=0)))
        limits.append(
            RateLimit(
                actions=actions,
                hits_addend=RateLimitHitsAddend(format=f"%DYNAMIC_METADATA({namespace}:{RATELIMIT_COST_KEY})%"),
                apply_on_stream_done=True,
            )
        )
    return RateLimitPerRoute(rate_limits=limits)


def _descriptor_action(entry: BudgetEntry) -> RateLimitAction:
    """One descriptor entry: a verified JWT claim (jwt_authn's ``principal``) or a request header.
    Absent (and no ``default`` for a claim): the descriptor is not sent, so that request is not limited."""
    if entry.header is not None:
        return RateLimitAction(request_headers=RateLimitActionRequestHeaders(header_name=entry.header, descriptor_key=entry.key))
    assert entry.claim is not None
    path = [MetadataKeyPathSegment(key=k) for k in (JWT_PAYLOAD_KEY, *entry.claim.split("."))]
    return RateLimitAction(
        metadata=RateLimitActionMetaData(
            descriptor_key=entry.key,
            metadata_key=MetadataKey(key=JWT_AUTHN_NAMESPACE, path=path),
            default_value=entry.default or "",
            source=RateLimitActionMetaDataSource.DYNAMIC,
        )
    )


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
    extproc_max_connections: int | None = None,
    extproc_max_requests_per_connection: int | None = EXTPROC_MAX_REQUESTS_PER_CONNECTION,
    ratelimit: RateLimitService | None = None,
    fewer_messages: bool = False,
    passthrough: tuple[str, ...] = (),
) -> Bootstrap:
    """A complete Envoy bootstrap. ``extproc=None`` builds the same proxy without the sidecar.

    ``tracing_otlp`` (a collector's ``host:port``, OTLP/gRPC) turns on Envoy's own OpenTelemetry
    tracing: Envoy's spans and the sidecar's then share one trace (the ext_proc stream carries
    Envoy's ``traceparent``, and the sidecar parents its span on it).

    ``ops_listen`` (needs ``admin``) adds a listener exposing only the admin's ``/ready`` and
    ``/stats/prometheus``, so the admin itself (which can stop Envoy) stays on loopback.

    ``extproc_tls`` connects to the sidecar over TLS (mTLS with a client certificate); for a
    sidecar that is not on loopback, with its ``tls`` config section set (docs/security-tls.md).

    ``extproc_streams_per_connection`` caps the ext_proc streams per HTTP/2 connection: lower
    means more connections, spread over more sidecar workers. ``extproc_max_connections`` caps
    the connections to the sidecar (default: 1,000; 128 in observability mode, see
    :data:`OBSERVE_MAX_CONNECTIONS`), so the streams in flight to it, at most their product.
    ``extproc_max_requests_per_connection`` recycles each connection after that many streams
    (``None``: never), so a skewed spread over the sidecar's workers does not last.

    ``ratelimit`` enforces budgets with Envoy's global rate limit filter (docs/budgets.md); it
    needs the sidecar (which computes each call's cost) in non-observability mode.

    ``fewer_messages`` selects the fewer-messages mode (no headers messages; docs/performance.md
    says when to choose it).

    ``passthrough`` lists path prefixes that bypass the sidecar (see :func:`with_passthrough`).
    """
    if ratelimit is not None and (extproc is None or observability_mode):
        raise ValueError("ratelimit needs the sidecar in its default mode: observability_mode ignores the metadata it returns")
    http_filters: list[HttpFilter] = []
    ep: ExternalProcessor | None = None
    if jwks_json is not None:
        http_filters.append(HttpFilter(name=JWT_AUTHN_FILTER, typed_config=pack(jwt_filter(jwks_json))))
    # The rate limit filter comes after jwt_authn (its descriptors read the claims) and BEFORE
    # ext_proc: ext_proc streams the request body (request_body_mode STREAMED; in the
    # fewer-messages mode it also lets the headers through at once) and holds the chunks in a
    # queue of its own while the sidecar reads them; a rate limit filter after it, resuming once
    # the limiter answered, found the request complete downstream with only part of the body
    # (or none) buffered, so ended the request there (the upstream got a truncated body, the rest
    # went nowhere). Before ext_proc, the limiter holds headers and body together
    # (StopAllIterationAndWatermark) and releases them in order. A call it refuses still reaches
    # the sidecar as a response (the 429's headers) in the default mode; in the fewer-messages
    # mode a 429 without a body sends no message (docs/budgets.md).
    if ratelimit is not None:
        http_filters.append(HttpFilter(name=RATELIMIT_FILTER, typed_config=pack(ratelimit_filter(ratelimit))))
    if extproc is not None:
        ep = ext_proc_filter(namespace, message_timeout_ms, observability_mode)
        if fewer_messages:
            fewer_messages_mode(ep)
        http_filters.append(HttpFilter(name=EXT_PROC_FILTER, typed_config=pack(ep)))
        if fewer_messages:
            http_filters.append(response_headers_filter())
    http_filters.append(HttpFilter(name=ROUTER_FILTER, typed_config=pack(Router())))
    upstreams = with_passthrough(upstreams, passthrough)
    routes = []
    for up in upstreams:
        r = Route(
            match=RouteMatch(prefix=up.prefix),
            route=RouteAction(cluster=up.cluster, timeout=timedelta(seconds=600), auto_host_rewrite=True),
        )
        if not up.observe:
            if extproc is not None:
                r.typed_per_filter_config[EXT_PROC_FILTER] = pack(ExtProcPerRoute(disabled=True))
            routes.append(r)  # nor rate limited: the sidecar, which computes the cost, never sees it
            continue
        if ep is not None and (up.provider or not up.request_body):
            overrides = ExtProcOverrides()
            if up.provider:
                overrides.grpc_initial_metadata = [HeaderValue(key=DEFAULT_PROVIDER_HEADER, value=up.provider)]
            if not up.request_body:
                # The route's mode replaces the filter's whole processing_mode: copy it.
                assert ep.processing_mode is not None
                overrides.processing_mode = dataclasses.replace(ep.processing_mode, request_body_mode=ProcessingModeBodySendMode.NONE)
            r.typed_per_filter_config[EXT_PROC_FILTER] = pack(ExtProcPerRoute(overrides=overrides))
        if ratelimit is not None:
            r.typed_per_filter_config[RATELIMIT_FILTER] = pack(ratelimit_per_route(ratelimit, namespace))
        routes.append(r)
    hcm = HttpConnectionManager(
        stat_prefix="llm",
        # One request, one path: Envoy normalises :path (RFC 3986: dot segments resolved,
        # percent-encoded unreserved characters decoded) and merges repeated slashes before any
        # filter or route sees it, so the sidecar recognises, and budgets charge,
        # /v1/chat/%63ompletions or //v1//embeddings as the calls the upstream serves. Encoded
        # slashes (%2F) stay as sent: model ids in paths carry them (Bedrock ARNs, Vertex).
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.KEEP_UNCHANGED,
        access_log=[
            AccessLog(
                name=FILE_ACCESS_LOG,
                typed_config=pack(
                    FileAccessLog(
                        path=access_log,
                        log_format=SubstitutionFormatString(
                            json_format=Struct.from_dict(access_log_format(namespace, budgets=ratelimit is not None)),
                            formatters=[TypedExtensionConfig(name=REQ_WITHOUT_QUERY_FORMATTER, typed_config=pack(ReqWithoutQuery()))],
                        ),
                    )
                ),
            )
        ],
        route_config=RouteConfiguration(name="llm", virtual_hosts=[VirtualHost(name="llm", domains=["*"], routes=routes)]),
        http_filters=http_filters,
    )
    if tracing_otlp is not None:
        hcm.tracing = envoy_tracing(tracing_service_name)
    clusters: dict[str, Cluster] = {}
    for up in upstreams:
        clusters.setdefault(up.cluster, _cluster(up))
    if extproc is not None:
        ext = _grpc_cluster("ext_proc", extproc, extproc_streams_per_connection, extproc_max_requests_per_connection)
        # At most extproc_streams_per_connection streams per HTTP/2 connection: under load Envoy
        # opens more connections (not just one per worker thread), so the kernel's SO_REUSEPORT
        # hashing spreads them over every sidecar worker process. And every in-flight LLM call
        # holds one stream: raise the default 1024 limits.
        if observability_mode:
            # Envoy never waits for the sidecar here: when it falls behind, the calls it cannot
            # take are better shed by Envoy at once (a stream past the limits fails, the call
            # goes on unobserved: ext_proc's streams_failed, the cluster's
            # upstream_rq_pending_overflow) than queued in Envoy or piled up as HTTP/2
            # connections in the sidecar (each one ~20-40 KB of a worker's memory).
            max_connections = extproc_max_connections or OBSERVE_MAX_CONNECTIONS
            limits = CircuitBreakersThresholds(
                max_requests=max_connections * extproc_streams_per_connection,
                max_pending_requests=OBSERVE_MAX_PENDING,
                max_connections=max_connections,
            )
        else:
            limits = CircuitBreakersThresholds(
                max_requests=100000, max_pending_requests=100000, max_connections=extproc_max_connections or 1000
            )
        ext.circuit_breakers = CircuitBreakers(thresholds=[limits])
        if extproc_tls is not None:
            ext.transport_socket = extproc_tls.transport_socket()
        clusters["ext_proc"] = ext
    if tracing_otlp is not None:
        clusters["otel_collector"] = _grpc_cluster("otel_collector", tracing_otlp)
    if ratelimit is not None:
        clusters["ratelimit"] = _grpc_cluster("ratelimit", ratelimit.address)
    listeners = [
        Listener(
            name="llm",
            address=_address(listen),
            filter_chains=[FilterChain(filters=[Filter(name=HTTP_CONNECTION_MANAGER, typed_config=pack(hcm))])],
        )
    ]
    if ops_listen is not None:
        if admin is None:
            raise ValueError("ops_listen needs an admin address")
        listeners.append(_ops_listener(ops_listen))
        clusters["envoy_admin"] = Cluster(
            name="envoy_admin",
            type=ClusterDiscoveryType.STATIC,
            connect_timeout=timedelta(seconds=1),
            load_assignment=_load_assignment("envoy_admin", admin),
        )
    cfg = Bootstrap(static_resources=BootstrapStaticResources(listeners=listeners, clusters=list(clusters.values())))
    if admin is not None:
        cfg.admin = Admin(address=_address(admin))
    return cfg


def envoy_tracing(service_name: str = "envoy") -> HttpConnectionManagerTracing:
    """HCM ``tracing``: Envoy's OpenTelemetry tracer, exporting to the ``otel_collector`` cluster."""
    return HttpConnectionManagerTracing(
        random_sampling=Percent(value=100),  # an incoming traceparent's sampled flag still decides
        spawn_upstream_span=True,
        provider=TracingHttp(
            name=OPENTELEMETRY_TRACER,
            typed_config=pack(
                OpenTelemetryConfig(
                    grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="otel_collector"), timeout=timedelta(seconds=1)),
                    service_name=service_name,
                )
            ),
        ),
    )


def _ops_listener(addr: str) -> Listener:
    """Readiness and Prometheus stats for kubelet/Prometheus, proxied to the loopback admin."""
    routes = [
        Route(
            match=RouteMatch(path=path, headers=[HeaderMatcher(name=":method", string_match=StringMatcher(exact="GET"))]),
            route=RouteAction(cluster="envoy_admin"),
        )
        for path in ("/ready", "/stats/prometheus")
    ]
    hcm = HttpConnectionManager(
        stat_prefix="ops",
        route_config=RouteConfiguration(name="ops", virtual_hosts=[VirtualHost(name="ops", domains=["*"], routes=routes)]),
        http_filters=[HttpFilter(name=ROUTER_FILTER, typed_config=pack(Router()))],
    )
    return Listener(
        name="ops",
        address=_address(addr),
        filter_chains=[FilterChain(filters=[Filter(name=HTTP_CONNECTION_MANAGER, typed_config=pack(hcm))])],
    )


def direct_response(listen: str, body: str, content_type: str = "application/json", admin: str | None = None) -> Bootstrap:
    """An Envoy answering every request with ``body`` (200): the benchmark's non-streaming upstream.

    The buffer filter holds each request until its body has arrived, so the response follows the
    whole request. A ``direct_response`` alone answers on the headers: the response then comes
    before the request is complete, and the Envoy in front closes an HTTP/1.1 connection after
    such a response, so every call paid a new connection to the upstream (a production Envoy
    reuses its upstream connections)."""
    route = Route(
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(status=200, body=DataSource(inline_string=body)),
        response_headers_to_add=[HeaderValueOption(header=HeaderValue(key="content-type", value=content_type))],
    )
    hcm = HttpConnectionManager(
        stat_prefix="up",
        route_config=RouteConfiguration(virtual_hosts=[VirtualHost(name="all", domains=["*"], routes=[route])]),
        http_filters=[
            HttpFilter(name=BUFFER_FILTER, typed_config=pack(Buffer(max_request_bytes=1 << 20))),
            HttpFilter(name=ROUTER_FILTER, typed_config=pack(Router())),
        ],
    )
    cfg = Bootstrap(
        static_resources=BootstrapStaticResources(
            listeners=[
                Listener(
                    name="up",
                    address=_address(listen),
                    filter_chains=[FilterChain(filters=[Filter(name=HTTP_CONNECTION_MANAGER, typed_config=pack(hcm))])],
                )
            ]
        )
    )
    if admin is not None:
        cfg.admin = Admin(address=_address(admin))
    return cfg


# An example JWKS (public key only) so the reference config validates; replace it with yours.
EXAMPLE_JWKS = (
    '{"keys":[{"kty":"RSA","kid":"example","alg":"RS256","use":"sig","e":"AQAB",'
    '"n":"u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw"}]}'
)


# Envoy in front of OpenAI and Anthropic, the sidecar beside it on loopback.
_REFERENCE: dict[str, Any] = {
    "listen": "0.0.0.0:10000",
    "upstreams": [
        Upstream("/v1/messages", "https://api.anthropic.com", "anthropic", http2=True),
        Upstream("/", "https://api.openai.com", "openai", http2=True),
    ],
    "extproc": "127.0.0.1:18080",
    "jwks_json": EXAMPLE_JWKS,
    "access_log": "/dev/stdout",
    "admin": "127.0.0.1:9901",
}


def reference(
    ratelimit: RateLimitService | None = None,
    fewer_messages: bool = False,
    passthrough: tuple[str, ...] = (),
    observability_mode: bool = False,
) -> Bootstrap:
    """envoy/envoy.yaml: the config users copy."""
    return bootstrap(
        **_REFERENCE, ratelimit=ratelimit, fewer_messages=fewer_messages, passthrough=passthrough, observability_mode=observability_mode
    )


def compose(
    ratelimit: RateLimitService | None = None,
    fewer_messages: bool = False,
    passthrough: tuple[str, ...] = (),
    observability_mode: bool = False,
) -> Bootstrap:
    """envoy/envoy-compose.yaml: docker-compose.yaml's Envoy; peers are reached by service name."""
    return bootstrap(
        listen="0.0.0.0:10000",
        upstreams=[Upstream("/", "http://mock-llm:8000", "openai")],
        extproc="extproc:18080",  # deploy/compose/extproc.yaml listens on 0.0.0.0:18080
        access_log="/dev/stdout",  # `docker compose logs envoy`
        admin="0.0.0.0:9901",  # Prometheus scrapes /stats/prometheus; published on host loopback only
        ratelimit=ratelimit,
        fewer_messages=fewer_messages,
        passthrough=passthrough,
        observability_mode=observability_mode,
    )


def kubernetes(
    ratelimit: RateLimitService | None = None,
    fewer_messages: bool = False,
    passthrough: tuple[str, ...] = (),
    observability_mode: bool = False,
) -> Bootstrap:
    """deploy/kubernetes/envoy.yaml: the reference, plus the ops listener the pod's probes use."""
    return bootstrap(
        **_REFERENCE,
        ops_listen="0.0.0.0:9902",  # readinessProbe /ready and the PodMonitor
        ratelimit=ratelimit,
        fewer_messages=fewer_messages,
        passthrough=passthrough,
        observability_mode=observability_mode,
    )


# The rate limit service of docs/budgets.md (envoyproxy/ratelimit's gRPC port, by service name).
EXAMPLE_RATELIMIT_SERVICE = "ratelimit:8081"


def budgets(
    ratelimit: RateLimitService | None = None,
    fewer_messages: bool = False,
    passthrough: tuple[str, ...] = (),
    observability_mode: bool = False,
) -> Bootstrap:
    """envoy/envoy-budgets.yaml: the reference with budgets per JWT ``team`` (docs/budgets.md)."""
    return reference(ratelimit or RateLimitService(EXAMPLE_RATELIMIT_SERVICE), fewer_messages, passthrough, observability_mode)


HEADER = """\
# Reference Envoy config for envoy-ai-extproc. Generated by `make envoy-config` from
# extproc/devtools/envoy_config.py (tests fail if it drifts). Copy it and adapt: upstream clusters, the
# JWKS, the access-log path. The pieces that matter for the sidecar are commented in the builder:
# ext_proc's failure_mode_allow, allow_mode_override, metadata_options, and the HTTP/2 ext_proc cluster.
"""


def dump(cfg: Bootstrap, header: str = "") -> str:
    """YAML for ``envoy -c``."""
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False, width=120)


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

BUDGETS_HEADER = """\
# The reference Envoy config with token budgets (docs/budgets.md): Envoy's rate limit filter asks the
# rate limit service at ratelimit:8081 (domain ai-budgets) whether the JWT's team is over budget, and
# charges each call the sidecar's ratelimit_cost when it is done. Generated by `make envoy-config` from
# extproc/devtools/envoy_config.py:budgets() (tests fail if it drifts); the sidecar needs
# `budgets: {enabled: true}`. Other settings: `extproc envoy-config --config SIDECAR.yaml --ratelimit-service HOST:PORT`.
"""

# Generated files: path in the repo -> (builder, header). `extproc envoy-config --variant NAME`.
VARIANTS = {
    "reference": ("envoy/envoy.yaml", reference, HEADER),
    "compose": ("envoy/envoy-compose.yaml", compose, COMPOSE_HEADER),
    "kubernetes": ("deploy/kubernetes/envoy.yaml", kubernetes, KUBERNETES_HEADER),
    "budgets": ("envoy/envoy-budgets.yaml", budgets, BUDGETS_HEADER),
}


def render(
    variant: str, ratelimit: RateLimitService | None = None, mode: Mode = MODES[DEFAULT_MODE], passthrough: tuple[str, ...] = ()
) -> str:
    """``extproc envoy-config``'s output; ValueError for a combination Envoy cannot honour
    (budgets in observability mode, a passthrough prefix no route matches)."""
    _, build, header = VARIANTS[variant]
    header += mode.comment()
    if passthrough:
        header += f"# not observed (`--passthrough`): paths starting with {', '.join(passthrough)}\n"
    return dump(build(ratelimit, mode.fewer_messages, passthrough, mode.observability), header)
