"""Faults: upstream resets and errors, Envoy's own errors, a frozen sidecar.

Traffic always flows; no tokens are invented; nothing raises in the sidecar.
"""

from __future__ import annotations

import signal
import time
import uuid

import httpx
import pytest

from extproc.devtools.dev import free_port
from extproc.devtools.envoy_config import Upstream
from tests.support.harness import Stack
from tests.support.recordings import load

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory, replay):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: Envoy answers 503 itself
    ups = [Upstream("/dead/", dead), Upstream("/", replay.url)]
    with Stack(tmp_path_factory.mktemp("faults"), replay.url, upstreams=ups) as s:
        yield s


def _send(stack, path="/v1/chat/completions", body=b'{"model":"gpt-4o","messages":[]}', **headers):
    rid = str(uuid.uuid4())
    r = httpx.post(stack.url(path), content=body, headers={"x-request-id": rid, "content-type": "application/json", **headers}, timeout=20)
    return r, stack.log_entry(rid)


@pytest.mark.parametrize(
    "status,ctype,body",
    [
        (429, "application/json", b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}'),
        (500, "application/json", b'{"error":{"message":"boom","type":"server_error"}}'),
        (502, "text/html", b"<html>Bad gateway</html>"),
        (503, "application/json", b""),
    ],
)
def test_upstream_error_bodies_pass_through_without_tokens(stack, status, ctype, body):
    r, entry = _send(stack, **{"x-status": str(status), "x-body": body.decode(), "x-content-type": ctype})
    assert r.status_code == status and r.content == body
    assert entry["response_code"] == status
    assert entry["total_tokens"] is None and entry["prompt_tokens"] is None
    assert entry["model"] == "gpt-4o"


def test_recorded_404_unknown_model(stack):
    rec = load("aigw__chat-unknown-model.yaml")
    r, entry = _send(stack, body=rec.request_body, **{"x-fixture": rec.name})
    assert r.status_code == 404 and r.content == rec.body and entry["total_tokens"] is None


def test_upstream_reset_mid_stream(stack):
    """The upstream sends two events, then drops the connection: the client gets exactly those
    bytes and then an error; no usage is recorded. (A reset within microseconds of the response
    headers reaches Envoy while it awaits the sidecar's headers reply and becomes Envoy's 503
    "reset before headers": see docs/configuration.md.)"""
    rec = load("aigw__chat-streaming-detailed-usage.yaml")
    rid = str(uuid.uuid4())
    got = b""
    with pytest.raises(httpx.HTTPError):
        with httpx.stream(
            "POST",
            stack.url(rec.path),
            content=rec.request_body,
            timeout=20,
            headers={"x-fixture": rec.name, "x-reset-after": "2", "x-chunk-delay-ms": "100", "x-request-id": rid},
        ) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                got += chunk
    assert got and rec.body.startswith(got) and got != rec.body
    entry = stack.log_entry(rid)
    assert entry["total_tokens"] is None  # the usage chunk never came


def test_envoy_local_503(stack):
    r, entry = _send(stack, path="/dead/v1/chat/completions")
    assert r.status_code == 503
    assert entry["response_code"] == 503 and entry["total_tokens"] is None


def test_sidecar_never_logged_a_traceback(stack):
    assert "Traceback" not in stack.sidecar_stderr()


def test_frozen_sidecar_exceeds_message_timeout_and_traffic_proceeds(tmp_path, replay):
    """A sidecar that stops answering delays a request by at most message_timeout; Envoy's
    ext_proc stats count the timeout (that is the 'metadata missed' signal to alert on)."""
    with Stack(tmp_path, replay.url, message_timeout_ms=300) as s:
        rec = load("aigw__chat-basic.yaml")
        s.sidecar.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r, entry = _send(s, body=rec.request_body, **{"x-fixture": rec.name})
            elapsed = time.monotonic() - t0
        finally:
            s.sidecar.send_signal(signal.SIGCONT)
        assert r.status_code == 200 and r.content == rec.body
        assert elapsed < 3.0
        assert entry["total_tokens"] is None
        assert s.envoy_stat("http.llm.ext_proc.message_timeouts") >= 1
