"""Names Envoy knows things by: filter and extension names, metadata namespaces, the ext_proc service.

Envoy matches these as plain strings (a typo is no error, just a filter that is never found or
metadata that never arrives), and several modules must agree on each one: the Envoy config we
generate names the ext_proc filter, and the servicer reads the attributes Envoy keys by that same
name; the config generator makes jwt_authn write its claims under a namespace that labels and
spans read. So each is spelled here once and imported everywhere else
(``tests/unit/test_envoy_names.py`` checks that no other module under ``extproc/`` spells one).
"""

from __future__ import annotations

# ---- HTTP filters (names in http_filters, keys of typed_per_filter_config) ---------------------
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
RATELIMIT_FILTER = "envoy.filters.http.ratelimit"
ROUTER_FILTER = "envoy.filters.http.router"
BUFFER_FILTER = "envoy.filters.http.buffer"
HEADER_TO_METADATA_FILTER = "envoy.filters.http.header_to_metadata"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"

# ---- other extensions --------------------------------------------------------------------------
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
FILE_ACCESS_LOG = "envoy.access_loggers.file"
REQ_WITHOUT_QUERY_FORMATTER = "envoy.formatter.req_without_query"
OPENTELEMETRY_TRACER = "envoy.tracers.opentelemetry"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"  # a cluster's protocol options key

# ---- metadata namespaces -----------------------------------------------------------------------
# Where the sidecar's dynamic metadata goes by default (``metadata.namespace``): kgateway's
# namespace, so access-log formats written for kgateway's AI gateway work unchanged.
AI_GATEWAY_NAMESPACE = "ai.gateway.kgateway.dev"
# jwt_authn writes the verified claims under its filter name, in the key its provider's
# ``payload_in_metadata`` names (``principal`` in the configs we generate).
JWT_AUTHN_NAMESPACE = JWT_AUTHN_FILTER
JWT_PAYLOAD_KEY = "principal"
# fewer-messages mode: a header_to_metadata filter copies response headers here, and ext_proc
# hands them to the sidecar as attributes (see extproc.devtools.envoy_config).
RESPONSE_HEADERS_NAMESPACE = "envoy.ai.response_headers"
# ProcessingRequest.attributes are keyed by the name of the filter that sent them.
ATTRIBUTES_KEY = EXT_PROC_FILTER

# ---- the gRPC service Envoy calls ---------------------------------------------------------------
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EXT_PROC_METHOD = f"/{EXT_PROC_SERVICE}/Process"
