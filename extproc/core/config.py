"""The sidecar's configuration: one YAML file, validated strictly at start-up.

Unknown keys and wrong types are errors (``ConfigError``; the CLI prints one line naming the key
and exits 2). Keys are camelCase, like the kgateway/agentgateway docs this project follows.
Each section is owned by the module that uses it; this module only describes and checks them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from extproc.core.envoy_names import AI_GATEWAY_NAMESPACE, JWT_AUTHN_NAMESPACE
from extproc.core.pricing import PricingConfig

DEFAULT_NAMESPACE = AI_GATEWAY_NAMESPACE
DEFAULT_LISTEN = "127.0.0.1:18080"
# The request header (and the grpc_initial_metadata key the generated Envoy configs set per route)
# naming the provider: ``providers.header``.
DEFAULT_PROVIDER_HEADER = "x-llm-provider"
# limits.maxGrpcMessageBytes' lowest allowed value: a smaller message is within the limit
# whatever it is set to (the server's receive path checks only larger ones against it).
MIN_GRPC_MESSAGE_BYTES = 64 << 10


class ConfigError(ValueError):
    """A bad config: the message names the key and the problem, on one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class MetadataConfig(_Section):
    namespace: str = DEFAULT_NAMESPACE


class PathRoute(_Section):
    """Map extra paths to a parser: ``{pathRegex: '^/my/llm$', api: openai.chat, provider: acme}``."""

    path_regex: str
    api: str
    provider: str | None = None

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class ProvidersConfig(_Section):
    header: str = DEFAULT_PROVIDER_HEADER  # request header (or grpc_initial_metadata key) naming the provider
    routes: list[PathRoute] = Field(default_factory=list)


class LimitsConfig(_Section):
    max_body_bytes: int = Field(16 << 20, ge=1024)  # non-streamed body we hold to parse
    max_event_bytes: int = Field(4 << 20, ge=1024)  # one SSE line or whole SSE event / NDJSON line
    max_decoded_bytes: int = Field(64 << 20, ge=1024)  # decompressed bytes per response
    # Work per ext_proc message, so one response cannot hold a worker's event loop (and every
    # other stream on it): past either bound the stream's parsing is abandoned (counted, reason
    # "message_budget"); its bytes still flow on untouched and its reply goes out at once.
    max_decoded_bytes_per_message: int = Field(8 << 20, ge=64 << 10)  # decompressed from one message
    max_lines_per_message: int = Field(10_000, ge=100)  # SSE/NDJSON lines, JSON-array elements in one message
    # Bytes held by all parsers of a worker (bodies, unfinished lines and events) at once; a
    # stream that would take more is abandoned (counted, reason "worker_held_bytes").
    max_held_bytes: int = Field(64 << 20, ge=1 << 20)
    # One gRPC message from Envoy (a body chunk, or a body Envoy buffered: bounded by its buffer
    # limits, 1 MiB by default). Larger ones end the stream with RESOURCE_EXHAUSTED before they are
    # read, like gRPC's own default receive limit (4 MiB).
    max_grpc_message_bytes: int = Field(4 << 20, ge=MIN_GRPC_MESSAGE_BYTES)
    # ext_proc streams (calls) one worker takes on. A new stream past either bound is refused as it
    # opens (HTTP/2 REFUSED_STREAM, nothing of it read; counted in ai_streams_refused_total):
    # Envoy lets that call through unobserved (failure_mode_allow).
    max_streams: int = Field(4096, ge=1)  # open at once (each holds ~15-20 KB while open)
    # Accepted but not yet started because the worker is busy with others: none in normal
    # operation; they pile up (with everything Envoy sent on them) when Envoy sends more than the
    # worker processes, as observability mode does, so this bounds a worker's memory under overload.
    max_waiting_streams: int = Field(128, ge=1)


LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Label names the built-in metrics use (extproc.telemetry.metrics checks it uses no others), plus names
# Prometheus itself gives meaning to: a custom label may not take any of them.
BUILTIN_LABELS = frozenset(
    {
        "llm",
        "model",
        "operation",
        "status_code",
        "outcome",
        "error_type",
        "reason",
        "label",
        "gen_ai_operation_name",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_response_model",
        "gen_ai_token_type",
        "metric",
        "le",
        "quantile",
        "job",
        "instance",
        "finish_reason",
    }
)


class CustomLabel(_Section):
    """An extra label on the AI metrics, like kgateway's ``stats.customLabels``.

    Its value comes from dynamic metadata Envoy forwards to the sidecar (``metadataKey``: a path
    inside ``metadataNamespace``, e.g. ``principal:team`` for a jwt_authn claim), from a request
    header (``header``, for API-key setups where a trusted filter sets it), or from a per-call
    attribution value (``field``: ``end_user``, ``session_id`` or ``key_id``, see ``attribution``).
    Missing: empty string. Never a label unless configured here (each is capped by maxLabelValues).
    """

    name: str
    metadata_namespace: str = JWT_AUTHN_NAMESPACE
    metadata_key: str | None = None
    key_delimiter: str = Field(":", min_length=1)
    header: str | None = None
    field: Literal["end_user", "session_id", "key_id"] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not LABEL_NAME.match(v) or v.startswith("__"):
            raise ValueError(f"{v!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)")
        if v in BUILTIN_LABELS:
            raise ValueError(f"{v!r} clashes with a built-in label ({', '.join(sorted(BUILTIN_LABELS))})")
        return v

    @field_validator("header")
    @classmethod
    def _not_a_credential(cls, v: str | None) -> str | None:
        from extproc.core.redact import is_credential_header

        if v is not None and is_credential_header(v):
            raise ValueError(
                f"{v!r} may carry a credential (its name contains auth, key, token, secret, cookie, "
                "password, session, credential or signature): not a label value"
            )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> CustomLabel:
        if sum(x is not None for x in (self.metadata_key, self.header, self.field)) != 1:
            raise ValueError("set exactly one of metadataKey, header or field")
        if self.metadata_key is not None and not self.metadata_key.strip(self.key_delimiter):
            raise ValueError("metadataKey is empty")
        return self


class OtlpMetricsConfig(_Section):
    """Metrics pushed over OTLP (``extproc.telemetry.otlp_metrics``), besides or instead of the
    Prometheus endpoint. Off unless ``enabled: true`` here, or (unset) ``OTEL_METRICS_EXPORTER``
    lists ``otlp``. Unset keys fall back to the standard OTEL_* variables, as for traces."""

    enabled: bool | None = None  # None: OTEL_METRICS_EXPORTER contains "otlp" (and OTEL_SDK_DISABLED is not true)
    endpoint: str | None = None  # grpc: host:port or http(s)://host:port; http: base or full /v1/metrics URL
    protocol: Literal["grpc", "http"] | None = None  # default: OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL, else grpc
    headers: dict[str, str] = Field(default_factory=dict)
    export_interval_ms: int | None = Field(None, ge=50)  # default OTEL_METRIC_EXPORT_INTERVAL, else 60000
    export_timeout_ms: int | None = Field(None, ge=1)  # default OTEL_METRIC_EXPORT_TIMEOUT, else 10000


class StatsConfig(_Section):
    """Prometheus endpoint (``/metrics``, ``/healthz``) and labels; owned by ``extproc.telemetry.metrics``."""

    # Loopback by default; containers/pods set 0.0.0.0 so Prometheus can scrape them (deploy/).
    address: str = "127.0.0.1"
    port: int = Field(9092, ge=0, lt=65536)  # 0 disables the endpoint (and metrics)
    # The endpoint's own bounds (docs/security.md): an exposition is rendered at most once per
    # renderIntervalSeconds and shared by the scrapes of that interval; at most
    # maxConcurrentScrapes wait for a render at once (others: 503 at once); at most maxConnections
    # are open (at the cap a new one closes the oldest waiting on its client); a connection must send its request within readTimeoutSeconds and take the response
    # within writeTimeoutSeconds, or it is closed.
    render_interval_seconds: float = Field(1.0, ge=0, le=60)
    max_concurrent_scrapes: int = Field(4, ge=1, le=1000)
    max_connections: int = Field(64, ge=1, le=10000)
    read_timeout_seconds: float = Field(2.0, gt=0, le=300)  # the request head; scrapers send it at once
    write_timeout_seconds: float = Field(30.0, gt=0, le=600)
    custom_labels: list[CustomLabel] = Field(default_factory=list)
    # Distinct values kept per label (custom labels, model, provider, error type) per process;
    # later new values are folded into "__overflow__" (counted by ai_label_values_overflow_total).
    max_label_values: int = Field(1000, ge=1)
    # Live series per metric family per process, as Prometheus counts them (a histogram's label
    # set is one series per bucket + _sum + _count, e.g. 19 for the duration histogram); a call
    # whose label set would exceed it is recorded in the family's "__overflow__" label set
    # (counted by ai_series_overflow_total).
    max_series: int = Field(2000, ge=1)
    otlp: OtlpMetricsConfig = Field(default_factory=OtlpMetricsConfig)

    @field_validator("custom_labels")
    @classmethod
    def _unique(cls, v: list[CustomLabel]) -> list[CustomLabel]:
        seen: set[str] = set()
        for label in v:
            if label.name in seen:
                raise ValueError(f"duplicate label name {label.name!r}")
            seen.add(label.name)
        return v


KEY_ID_SECRET_ENV = "EXTPROC_KEY_ID_SECRET"
MIN_KEY_ID_SECRET = 16


def _plain_header(v: str | None) -> str | None:
    from extproc.core.redact import is_credential_header

    if v is not None and is_credential_header(v):
        raise ValueError(
            f"{v!r} may carry a credential (its name contains auth, key, token, secret, cookie, "
            "password, session, credential or signature): not an end-user id"
        )
    return v.lower() if v is not None else v


def _session_headers(v: list[str]) -> list[str]:
    from extproc.core.redact import is_credential_header

    for name in v:
        # "session" is the point of these headers; any other credential word is refused.
        if is_credential_header(name.lower().replace("session", "")):
            raise ValueError(
                f"{name!r} may carry a credential (its name contains auth, key, token, secret, cookie, "
                "password, credential or signature): not a session id"
            )
    return [n.lower() for n in v]


class AttributionConfig(_Section):
    """Who a call was for (``extproc.core.attribution``): end user, session, API key id.

    ``end_user``: the request body's own field (OpenAI ``user``/``safety_identifier``, Anthropic
    ``metadata.user_id``), overridden by ``endUserHeader`` when set and present. ``session_id``:
    the first of ``sessionHeaders`` present. ``key_id``: HMAC-SHA256 of the caller's API key with
    ``keyIdSecret`` (else the ``EXTPROC_KEY_ID_SECRET`` variable), first 12 hex characters; off
    without a secret. Values are cut to 128 characters."""

    end_user_header: Annotated[str | None, AfterValidator(_plain_header)] = None
    session_headers: Annotated[list[str], AfterValidator(_session_headers)] = Field(
        default_factory=lambda: ["x-session-id", "agent-session-id"]
    )
    key_id_secret: SecretStr | None = None

    @field_validator("key_id_secret")
    @classmethod
    def _secret_length(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_KEY_ID_SECRET:
            raise ValueError(f"too short: use at least {MIN_KEY_ID_SECRET} random characters")
        return v

    @model_validator(mode="after")
    def _env_secret(self) -> AttributionConfig:
        import os

        env = os.environ.get(KEY_ID_SECRET_ENV)
        if self.key_id_secret is None and env is not None and len(env) < MIN_KEY_ID_SECRET:
            raise ValueError(f"{KEY_ID_SECRET_ENV} is too short: use at least {MIN_KEY_ID_SECRET} random characters")
        return self

    def secret(self) -> bytes | None:
        """The key-id secret: this config's, else the environment's; None: key ids off."""
        import os

        if self.key_id_secret is not None:
            return self.key_id_secret.get_secret_value().encode()
        env = os.environ.get(KEY_ID_SECRET_ENV)
        return env.encode() if env else None


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


def _cel(expr: str) -> str:
    from extproc.core.cel import compile_field  # only configs that use fields pay for CEL

    compile_field(expr)  # raises ValueError with the parser's first line
    return expr


CelExpression = Annotated[str, AfterValidator(_cel)]


class TracingFields(_Section):
    """Span attribute customisation: ``remove`` default attributes, ``add`` CEL-computed ones."""

    add: dict[str, CelExpression] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)  # exact names, or a prefix ending in ".*"


Convention = Literal["genai", "openinference", "langfuse", "openllmetry"]
DEFAULT_NO_CAPTURE_HEADER = "x-extproc-no-capture"
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}\Z")


def _default_conventions() -> list[Convention]:
    return ["genai"]


class TracingConfig(_Section):
    """OTLP traces; owned by ``extproc.telemetry.tracing``. Off unless an endpoint is set here or in
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``. Unset keys fall back to the standard OTEL_* variables."""

    otlp_endpoint: str | None = None  # grpc: host:port or http(s)://host:port; http: base or full /v1/traces URL
    otlp_protocol: Literal["grpc", "http"] | None = None  # default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. {authorization: "Basic ..."}
    random_sampling: bool | float | None = None  # true/false or a ratio; default OTEL_TRACES_SAMPLER
    service_name: str | None = None  # default OTEL_SERVICE_NAME, else envoy-ai-extproc
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    # Attribute sets on each span, any of: "genai" (OpenTelemetry GenAI conventions),
    # "openinference" (Arize Phoenix), "langfuse" (langfuse.*), "openllmetry" (Traceloop's names).
    conventions: list[Convention] = Field(default_factory=_default_conventions, min_length=1)
    capture_content: bool = False  # prompts and completions on spans (gen_ai.input/output.messages)
    # A request carrying this header (any value) gets no content capture, whatever captureContent
    # says; null: no per-request switch. Read for its presence only, never a label.
    no_capture_header: str | None = DEFAULT_NO_CAPTURE_HEADER
    max_content_chars: int = Field(16384, ge=0)  # cap on captured text per call (input, output each)
    max_queue_size: int = Field(2048, ge=1)  # spans waiting for export; beyond it they are dropped
    max_export_batch_size: int = Field(512, ge=1)
    schedule_delay_ms: int = Field(1000, ge=1)
    export_timeout_ms: int = Field(10000, ge=1)
    fields: TracingFields = Field(default_factory=TracingFields)

    @field_validator("no_capture_header")
    @classmethod
    def _header_name(cls, v: str | None) -> str | None:
        if v is not None and not HEADER_NAME.match(v):
            raise ValueError(f"{v!r} is not an HTTP header name (letters, digits, !#$%&'*+-.^_`|~; up to 128)")
        return v.lower() if v is not None else v

    @field_validator("random_sampling")
    @classmethod
    def _ratio(cls, v: bool | float | None) -> bool | float | None:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError("a ratio must be between 0 and 1")
        return v


DEFAULT_BUDGET_DOMAIN = "ai-budgets"


class BudgetEntry(_Section):
    """One entry of a rate limit descriptor: ``key`` as the rate limit service matches it, the
    value from a verified JWT claim (``claim``: a jwt_authn payload path, ``team``, ``sub``,
    ``org.id``) or a request header (``header``). A request without the value sends no descriptor
    (it is not limited), unless ``default`` (claims only) stands in."""

    key: str = Field(min_length=1)
    claim: str | None = None
    header: str | None = None
    default: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BudgetEntry:
        if (self.claim is None) == (self.header is None):
            raise ValueError("set exactly one of claim or header")
        if self.claim is not None and not all(self.claim.split(".")):
            raise ValueError(f"claim {self.claim!r}: empty path segment")
        if self.header is not None and self.default is not None:
            raise ValueError("default: only for a claim (Envoy's request_headers action has none)")
        return self


class BudgetDescriptor(_Section):
    """One budget: the descriptor Envoy sends (its entries in order), e.g. ``[{key: team, claim: team}]``."""

    entries: list[BudgetEntry] = Field(min_length=1)


def _default_descriptors() -> list[BudgetDescriptor]:
    return [BudgetDescriptor(entries=[BudgetEntry(key="team", claim="team")])]


# Envoy rejects a hits_addend above this (RateLimit.HitsAddend): a charge never exceeds it.
MAX_CHARGE = 1_000_000_000


class BudgetsConfig(_Section):
    """Token or dollar budgets enforced by Envoy's rate limit filter (docs/budgets.md).

    The sidecar's part: with ``enabled``, it writes each call's cost in ``unit`` as the integer
    dynamic metadata ``ratelimit_cost`` whenever usage is seen (``extproc.telemetry.metadata``).
    ``unit``: ``total_tokens``, ``input_tokens``, ``output_tokens``, ``weighted`` (the CEL
    expression ``weight`` over ``llm.*``, e.g. ``llm.input_tokens + 4 * llm.output_tokens``) or
    ``micro_usd`` (the call's priced cost in millionths of a dollar; needs ``pricing``).
    Envoy's part (``extproc envoy-config``/``extproc dev`` with ``--ratelimit-service``):
    ``domain``, ``descriptors`` (one budget each), ``failureModeDeny``, ``timeoutMs``,
    ``xRateLimitHeaders``.
    """

    enabled: bool = False
    unit: Literal["total_tokens", "input_tokens", "output_tokens", "weighted", "micro_usd"] = "total_tokens"
    weight: CelExpression | None = None  # unit: weighted
    domain: str = Field(DEFAULT_BUDGET_DOMAIN, min_length=1)
    descriptors: list[BudgetDescriptor] = Field(default_factory=_default_descriptors, min_length=1)
    failure_mode_deny: bool = False  # limiter down or slow: false lets traffic through (uncharged)
    timeout_ms: int = Field(500, ge=1, le=60000)  # each call to the rate limit service
    x_ratelimit_headers: bool = True  # X-RateLimit-Limit/-Remaining/-Reset on responses
    # A call served (status < 400) without usage (a stream without include_usage, a client
    # hang-up before the usage, an upstream that reports none) is charged the request's own
    # max output tokens when it set them (token units), else this, in ``unit``. Unset: 4,096
    # tokens, or 100,000 micro-USD ($0.10). Never free: docs/budgets.md, "What is charged when".
    unreported_charge: int | None = Field(None, ge=0, le=MAX_CHARGE)
    # unit micro_usd: a call no price covers (a model neither the catalogue nor pricing.models
    # knows) is charged its tokens at this rate, USD per million tokens (= micro-USD per token).
    unpriced_usd_per_million_tokens: float = Field(75.0, ge=0, le=1e6, allow_inf_nan=False)

    @property
    def unreported(self) -> int:
        """What a served call without usage is charged when its request set no ceiling."""
        if self.unreported_charge is not None:
            return self.unreported_charge
        return 100_000 if self.unit == "micro_usd" else 4096

    @model_validator(mode="after")
    def _weight(self) -> BudgetsConfig:
        if self.unit == "weighted" and self.weight is None:
            raise ValueError("unit weighted needs weight (a CEL expression over llm.*)")
        if self.unit != "weighted" and self.weight is not None:
            raise ValueError(f"weight: only used with unit weighted (unit is {self.unit})")
        if self.weight is not None:
            from extproc.core.cel import compile_field

            _, flatten, used = compile_field(self.weight)
            if flatten or used - {"llm"}:
                raise ValueError("weight: a number computed from llm.* only (no flatten, jwt, request...)")
        return self


def _readable(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        with open(v, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"cannot read {v}: {e.strerror}") from None
    return v


ReadableFile = Annotated[str, AfterValidator(_readable)]


class TlsConfig(_Section):
    """TLS on the ext_proc listener (owned by ``extproc.server.tls``); off unless certFile/keyFile are set.

    ``clientCaFile`` turns on mTLS: clients must present a certificate signed by that CA. TLS needs
    a TCP ``listen``: a unix socket is refused (its file permissions are the access control).
    ``healthListen`` stays plaintext (health only), for kubelet gRPC probes and ``extproc health``.
    """

    cert_file: ReadableFile | None = None  # PEM server certificate (chain)
    key_file: ReadableFile | None = None  # PEM private key of cert_file
    client_ca_file: ReadableFile | None = None  # PEM CA bundle; set: client certificates REQUIRED

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        import ssl

        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both certFile and keyFile, or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("clientCaFile needs certFile and keyFile")
        if self.cert_file is not None:
            try:  # the same PEM gRPC will load: a bad file or a key that does not match fails here
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(f"certFile/keyFile: not a matching PEM certificate and key ({e})") from None
        if self.client_ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.client_ca_file)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(f"clientCaFile: no PEM CA certificate ({e})") from None
        return self


class Config(_Section):
    listen: str = DEFAULT_LISTEN  # host:port, or unix:/path/to.sock
    # Optional second address serving only grpc.health.v1 (the ext_proc address serves it too).
    # For Kubernetes' grpc probes, which dial the pod IP, while ext_proc stays on loopback. During
    # a drain it keeps answering (NOT_SERVING) until the ext_proc server has stopped.
    health_listen: str | None = None
    metadata: MetadataConfig = Field(default_factory=MetadataConfig)
    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)  # TLS / mTLS on `listen` (not healthListen)
    pricing: PricingConfig = Field(default_factory=PricingConfig)  # cost in USD; see extproc.core.pricing
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)  # ratelimit_cost for Envoy's rate limit filter
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)  # end user, session, key id
    # SIGTERM: health turns NOT_SERVING, no new streams are accepted, and the streams in flight get
    # this long to finish (their metrics are recorded) before they are cancelled and we exit 0.
    # Keep it below Kubernetes' terminationGracePeriodSeconds (minus any preStop sleep).
    shutdown_grace_seconds: float = Field(20.0, ge=0, le=3600)
    # The workers' event loop, read at start: uvloop (libuv; less CPU per streamed chunk, see
    # docs/performance.md) or the standard library's asyncio loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @field_validator("listen", "health_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("unix:"):
            if len(v) <= 5:
                raise ValueError("unix: needs a socket path")
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port or unix:/path")
        return v

    @model_validator(mode="after")
    def _tls_needs_tcp(self) -> Config:
        if self.tls.enabled and self.listen.startswith("unix:"):
            raise ValueError("tls: not used on a unix: listen address (protect the socket with file permissions)")
        return self

    @field_validator("budgets")
    @classmethod
    def _budget_priced(cls, v: BudgetsConfig, info: ValidationInfo) -> BudgetsConfig:
        pricing = info.data.get("pricing")
        if v.enabled and v.unit == "micro_usd" and pricing is not None and not pricing.enabled:
            raise ValueError("unit micro_usd needs pricing.enabled: true")
        return v

    @model_validator(mode="after")
    def _switch_is_never_a_value(self) -> Config:
        """``tracing.noCaptureHeader`` turns capture off for a request; read for its presence only,
        it may not also be read as a value: a metric label, an attribution value, a budget key."""
        switch = self.tracing.no_capture_header
        if switch is None:
            return self
        a = self.attribution
        uses = [
            *((f"stats.customLabels.{i}.header", c.header) for i, c in enumerate(self.stats.custom_labels)),
            ("attribution.endUserHeader", a.end_user_header),
            *((f"attribution.sessionHeaders.{i}", h) for i, h in enumerate(a.session_headers)),
            *(
                (f"budgets.descriptors.{i}.entries.{j}.header", e.header)
                for i, d in enumerate(self.budgets.descriptors)
                for j, e in enumerate(d.entries)
            ),
        ]
        for key, header in uses:
            if header is not None and header.lower() == switch:
                raise ValueError(f"{key}: {header!r} is tracing.noCaptureHeader, the per-request capture switch: never a label or a value")
        return self


def parse(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    if "server" in data:
        raise ConfigError(f"{source}: server: removed; the sidecar has one gRPC server (grpclib) now, delete this key")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = str(err["ctx"]["error"])  # our validators' own words, without pydantic's prefix
            if not err["loc"]:
                raise ConfigError(f"{source}: {msg}") from None  # a check across sections names its keys itself
        raise ConfigError(f"{source}: {key}: {msg}") from None


# A config file is a few KB; anything near this is not one.
MAX_CONFIG_BYTES = 4 << 20


def read_config_file(path: str | Path) -> str:
    """The file's text. Only a regular file is read: a FIFO, a device or a directory is refused
    at once (opened non-blocking, checked with fstat), never waited on (a SIGHUP reload runs on
    the worker's event loop)."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    text = read_config_file(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse(data, str(p))
