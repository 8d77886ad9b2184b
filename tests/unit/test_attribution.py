"""Attribution: the end user, session id and API-key id reach the metadata, the spans and the
metric labels (the key only as a keyed hash, never the key itself)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from prometheus_client import CollectorRegistry

from extproc.core import config
from extproc.core.attribution import api_key, key_id
from extproc.core.config import ConfigError, parse
from extproc.server.processor import Processor
from extproc.telemetry.metrics import MetricsObserver
from extproc.telemetry.tracing import span_attributes, variables
from tests.unit.test_processor import Recorder, body, headers, meta, req_headers, run

SECRET = "op-secret-0123456789abcdef"
CHAT = b'{"id":"c1","model":"m","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'
ANTHROPIC = (
    b'{"id":"msg_1","type":"message","model":"claude-x","stop_reason":"end_turn",'
    b'"usage":{"input_tokens":3,"output_tokens":4},"content":[{"type":"text","text":"hi"}]}'
)


def call_through(cfg: dict, req: bytes, path: str = "/v1/chat/completions", response: bytes = CHAT, **hdrs: str):
    rec = Recorder()
    p = Processor(parse(cfg), [rec])
    replies = run(
        p,
        [
            req_headers(path, **hdrs),
            body("request_body", req, end=True),
            headers("response_headers", **{":status": "200", "content-type": "application/json"}),
            body("response_body", response, end=True),
        ],
    )
    return rec.calls[0], meta(replies[-1])


def test_openai_user_and_session_header_reach_metadata_and_span():
    call, m = call_through({}, b'{"model":"m","messages":[],"user":"u-1"}', x_session_id="s-1")
    assert (m["end_user"], m["session_id"]) == ("u-1", "s-1")
    assert "key_id" not in m  # no secret configured: key ids are off
    a = span_attributes(call, False, 0)
    assert a["user.id"] == "u-1" and a["session.id"] == "s-1" and a["gen_ai.conversation.id"] == "s-1"
    v = variables(call, False)["llm"]
    assert (v["end_user"], v["session_id"]) == ("u-1", "s-1")


def test_safety_identifier_is_preferred_and_agent_session_id_is_accepted():
    _, m = call_through({}, b'{"model":"m","messages":[],"user":"old","safety_identifier":"hashed-9"}', agent_session_id="a-7")
    assert (m["end_user"], m["session_id"]) == ("hashed-9", "a-7")


def test_anthropic_metadata_user_id():
    _, m = call_through(
        {}, b'{"model":"claude-x","max_tokens":9,"messages":[],"metadata":{"user_id":"u-anth"}}', path="/v1/messages", response=ANTHROPIC
    )
    assert m["end_user"] == "u-anth"


def test_configured_header_overrides_the_body_and_values_are_cut_to_128():
    cfg = {"attribution": {"endUserHeader": "X-End-User", "sessionHeaders": ["x-conv"]}}
    _, m = call_through(
        cfg, b'{"model":"m","messages":[],"user":"from-body"}', x_end_user="from-header", x_conv="c" * 500, x_session_id="ignored"
    )
    assert m["end_user"] == "from-header"
    assert m["session_id"] == "c" * 128
    _, m = call_through(cfg, b'{"model":"m","messages":[],"user":"' + b"u" * 300 + b'"}')
    assert m["end_user"] == "u" * 128


def test_non_string_user_is_ignored():
    _, m = call_through({}, b'{"model":"m","messages":[],"user":{"id":1},"safety_identifier":42}')
    assert "end_user" not in m


@pytest.mark.parametrize(
    "hdrs, key",
    [
        ({"authorization": "Bearer sk-live-1"}, "sk-live-1"),
        ({"authorization": "bearer   sk-live-1 "}, "sk-live-1"),
        ({"x-api-key": "ak-2"}, "ak-2"),
        ({"api-key": "az-3"}, "az-3"),
        ({"x-goog-api-key": "g-4"}, "g-4"),
        ({"authorization": "Basic dXNlcjpwdw==", "x-api-key": "ak-5"}, "ak-5"),  # not a bearer key: next header
        ({"cookie": "k=v"}, None),
    ],
)
def test_api_key_sources(hdrs, key):
    assert api_key(hdrs) == key


def test_key_id_is_a_keyed_hash_and_never_the_key():
    cfg = {"attribution": {"keyIdSecret": SECRET}}
    call, m = call_through(cfg, b'{"model":"m","messages":[]}', authorization="Bearer sk-live-AAAA")
    want = hmac.new(SECRET.encode(), b"sk-live-AAAA", hashlib.sha256).hexdigest()[:12]
    assert m["key_id"] == want == key_id(SECRET.encode(), "sk-live-AAAA")
    _, other_key = call_through(cfg, b'{"model":"m","messages":[]}', x_api_key="sk-live-BBBB")
    _, other_secret = call_through(
        {"attribution": {"keyIdSecret": "another-secret-0123456"}}, b'{"model":"m","messages":[]}', authorization="Bearer sk-live-AAAA"
    )
    assert len({m["key_id"], other_key["key_id"], other_secret["key_id"]}) == 3
    a = span_attributes(call, False, 0)
    assert a["extproc.key_id"] == want
    assert "sk-live-AAAA" not in repr(a) + repr(m) + repr(variables(call, False))


def test_key_id_secret_from_the_environment(monkeypatch):
    monkeypatch.setenv(config.KEY_ID_SECRET_ENV, SECRET)
    _, m = call_through({}, b'{"model":"m","messages":[]}', authorization="Bearer sk-live-AAAA")
    assert m["key_id"] == key_id(SECRET.encode(), "sk-live-AAAA")


def test_bad_attribution_config_names_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="attribution.keyIdSecret: too short"):
        parse({"attribution": {"keyIdSecret": "short"}})
    with pytest.raises(ConfigError, match="attribution.endUserHeader: 'authorization' may carry a credential"):
        parse({"attribution": {"endUserHeader": "authorization"}})
    with pytest.raises(ConfigError, match="attribution.sessionHeaders: 'x-session-token' may carry a credential"):
        parse({"attribution": {"sessionHeaders": ["x-session-token"]}})
    monkeypatch.setenv(config.KEY_ID_SECRET_ENV, "short")
    with pytest.raises(ConfigError, match="EXTPROC_KEY_ID_SECRET is too short"):
        parse({})
    assert SECRET not in repr(parse({"attribution": {"keyIdSecret": SECRET}}))


def test_custom_label_from_end_user_overflows_past_max_label_values():
    stats = config.StatsConfig.model_validate({"customLabels": [{"name": "end_user", "field": "end_user"}], "maxLabelValues": 2})
    registry = CollectorRegistry()
    m = MetricsObserver(stats, registry)
    for user in ("u-1", "u-2", "u-3", "u-4", "u-1"):
        call, _ = call_through({}, b'{"model":"m","messages":[],"user":"' + user.encode() + b'"}')
        m.record(call)

    def prompt(user: str) -> float | None:
        return registry.get_sample_value("ai_prompt_tokens_total", {"llm": "openai", "model": "m", "end_user": user})

    assert (prompt("u-1"), prompt("u-2"), prompt("__overflow__")) == (10.0, 5.0, 10.0)
    assert registry.get_sample_value("ai_label_values_overflow_total", {"label": "end_user"}) == 2.0


def test_custom_label_source_is_exactly_one():
    with pytest.raises(ConfigError, match="set exactly one of metadataKey, header or field"):
        parse({"stats": {"customLabels": [{"name": "u", "field": "end_user", "header": "x-u"}]}})
    with pytest.raises(ConfigError, match="stats.customLabels.0.field"):
        parse({"stats": {"customLabels": [{"name": "u", "field": "password"}]}})
