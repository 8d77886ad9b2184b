"""The sidecar's configuration: one YAML file, validated strictly at start-up.

Unknown keys and wrong types are errors (``ConfigError``; the CLI prints one line naming the key
and exits 2). Keys are camelCase, like the kgateway/agentgateway docs this project follows.
Each section is owned by the module that uses it; this module only describes and checks them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_NAMESPACE = "ai.gateway.kgateway.dev"
DEFAULT_LISTEN = "127.0.0.1:18080"


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
    header: str = "x-llm-provider"  # request header (or grpc_initial_metadata key) naming the provider
    routes: list[PathRoute] = Field(default_factory=list)


class LimitsConfig(_Section):
    max_body_bytes: int = Field(16 << 20, ge=1024)  # non-streamed body we hold to parse
    max_event_bytes: int = Field(4 << 20, ge=1024)  # one SSE / NDJSON line
    max_decoded_bytes: int = Field(64 << 20, ge=1024)  # decompressed bytes per response


JWT_AUTHN_NAMESPACE = "envoy.filters.http.jwt_authn"
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Label names the built-in metrics use (extproc.metrics checks it uses no others), plus names
# Prometheus itself gives meaning to: a custom label may not take any of them.
BUILTIN_LABELS = frozenset({
    "llm", "model", "operation", "status_code", "outcome", "error_type", "reason", "label",
    "gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model",
    "gen_ai_token_type", "le", "quantile", "job", "instance",
})


class CustomLabel(_Section):
    """An extra label on the AI metrics, like kgateway's ``stats.customLabels``.

    Its value comes from dynamic metadata Envoy forwards to the sidecar (``metadataKey``: a path
    inside ``metadataNamespace``, e.g. ``principal:team`` for a jwt_authn claim) or from a request
    header (``header``, for API-key setups where a trusted filter sets it). Missing: empty string.
    """

    name: str
    metadata_namespace: str = JWT_AUTHN_NAMESPACE
    metadata_key: str | None = None
    key_delimiter: str = Field(":", min_length=1)
    header: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not LABEL_NAME.match(v) or v.startswith("__"):
            raise ValueError(f"{v!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)")
        if v in BUILTIN_LABELS:
            raise ValueError(f"{v!r} clashes with a built-in label ({', '.join(sorted(BUILTIN_LABELS))})")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> CustomLabel:
        if (self.metadata_key is None) == (self.header is None):
            raise ValueError("set exactly one of metadataKey or header")
        if self.metadata_key is not None and not self.metadata_key.strip(self.key_delimiter):
            raise ValueError("metadataKey is empty")
        return self


class StatsConfig(_Section):
    """Prometheus endpoint (``/metrics``, ``/healthz``) and labels; owned by ``extproc.metrics``."""

    address: str = "0.0.0.0"  # Prometheus scrapes the pod IP; bind 127.0.0.1 to keep it local
    port: int = Field(9092, ge=0, lt=65536)  # 0 disables the endpoint (and metrics)
    custom_labels: list[CustomLabel] = Field(default_factory=list)
    # Distinct values kept per label (custom labels, model, provider, error type) per process;
    # later new values are folded into "__overflow__" (counted by ai_label_values_overflow_total).
    max_label_values: int = Field(1000, ge=1)

    @field_validator("custom_labels")
    @classmethod
    def _unique(cls, v: list[CustomLabel]) -> list[CustomLabel]:
        seen: set[str] = set()
        for label in v:
            if label.name in seen:
                raise ValueError(f"duplicate label name {label.name!r}")
            seen.add(label.name)
        return v


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    listen: str = DEFAULT_LISTEN  # host:port, or unix:/path/to.sock
    metadata: MetadataConfig = Field(default_factory=MetadataConfig)
    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            if len(v) <= 5:
                raise ValueError("unix: needs a socket path")
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port or unix:/path")
        return v


def parse(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"{source}: {key}: {msg}") from None


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse(data, str(p))
