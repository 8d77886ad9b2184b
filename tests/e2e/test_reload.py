"""SIGHUP reloads the sidecar config: streams in flight finish and are counted, counters
are not reset, new settings apply to the next requests, and a bad file or a change that needs a
restart leaves the running config in place."""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest
import yaml

from tests.support.harness import Stack, scrape, total
from tests.support.recordings import load

pytestmark = pytest.mark.integration


def _wait_log(stack: Stack, text: str, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while stack.sidecar_stderr().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not logged: {stack.sidecar_stderr()[-1500:]}"
        time.sleep(0.05)


def _post(stack: Stack, path: str, fixture: str) -> dict:
    rid = str(uuid.uuid4())
    rec = load(fixture)
    r = httpx.post(
        stack.url(path),
        content=rec.request_body,
        timeout=20,
        headers={"x-fixture": fixture, "x-request-id": rid, "content-type": "application/json"},
    )
    assert r.status_code == 200 and r.content == rec.body
    return stack.log_entry(rid)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_applies_new_config_without_dropping_streams(tmp_path, replay, workers):
    with Stack(tmp_path, replay.url, workers=workers) as s:
        assert _post(s, "/custom/llm", "aigw__chat-basic.yaml")["total_tokens"] is None  # unknown path: not parsed
        rec = load("aigw__chat-streaming-detailed-usage.yaml")
        gate, rid = str(uuid.uuid4()), str(uuid.uuid4())
        headers = {"x-fixture": rec.name, "x-gate": gate, "x-request-id": rid, "content-type": "application/json"}
        with httpx.stream("POST", s.url(rec.path), content=rec.request_body, headers=headers, timeout=20) as r:
            chunks = r.iter_raw()
            first = next(chunks)  # this stream is in flight across the reload
            before = total(scrape(s.metrics_port), "ai_requests_total")
            cfg = yaml.safe_load(s.sidecar_config_path.read_text())
            cfg["providers"] = {"routes": [{"pathRegex": "^/custom/llm$", "api": "openai.chat", "provider": "acme"}]}
            s.sidecar_config_path.write_text(yaml.safe_dump(cfg))
            s.sidecar.send_signal(signal.SIGHUP)
            _wait_log(s, '"msg":"config reloaded"', workers)
            replay.open_gate(gate)
            assert first + b"".join(chunks) == rec.body
        entry = s.log_entry(rid)
        assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (12, 100, 112)
        mapped = _post(s, "/custom/llm", "aigw__chat-basic.yaml")
        assert mapped["provider"] == "acme" and mapped["total_tokens"] == 385
        deadline = time.monotonic() + 10
        while total(scrape(s.metrics_port), "ai_requests_total") < before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert total(scrape(s.metrics_port), "ai_requests_total") == before + 2  # kept counting, no reset

        # A broken file, then a restart-only change: both refused, the running config stays.
        s.sidecar_config_path.write_text("providers: [not, a, mapping]\n")
        s.sidecar.send_signal(signal.SIGHUP)
        _wait_log(s, '"msg":"config reload failed; keeping the running config"', workers)
        cfg["listen"] = "127.0.0.1:1"
        s.sidecar_config_path.write_text(yaml.safe_dump(cfg))
        s.sidecar.send_signal(signal.SIGHUP)
        _wait_log(s, "need a restart", workers)
        assert _post(s, "/custom/llm", "aigw__chat-basic.yaml")["provider"] == "acme"
        assert s.sidecar.poll() is None


def test_rejected_reload_is_not_half_applied_nor_adopted_by_the_supervisor(tmp_path, replay):
    """Through Envoy: a file that fails only in the servicer's check (an unknown
    providers.routes[].api) changes nothing (not the namespace, the limits or the provider key:
    the access-log fields stay set, no stray maxBodyBytes), and the supervisor does not adopt it
    (else the next worker restarted would fail on it until the sidecar gave up)."""
    with Stack(tmp_path, replay.url, workers=2) as s:
        assert _post(s, "/v1/chat/completions", "aigw__chat-basic.yaml")["total_tokens"] == 385
        cfg = yaml.safe_load(s.sidecar_config_path.read_text())
        cfg["metadata"] = {"namespace": "not.the.access.log.namespace"}
        cfg["limits"] = {"maxBodyBytes": 1024}
        cfg["providers"] = {"routes": [{"pathRegex": "^/custom/llm$", "api": "no.such.api"}]}
        s.sidecar_config_path.write_text(yaml.safe_dump(cfg))
        s.sidecar.send_signal(signal.SIGHUP)
        _wait_log(s, '"msg":"config reload failed; keeping the running config"', 2)
        for _ in range(4):  # both workers, whichever Envoy picks
            entry = _post(s, "/v1/chat/completions", "aigw__chat-basic.yaml")
            assert entry["total_tokens"] == 385 and entry["prompt_tokens"] is not None
        victim = min(s.listening_pids())
        os.kill(victim, signal.SIGKILL)
        s.wait_listening(3)  # the restarted worker came up on the running config
        assert "workers keep dying" not in s.sidecar_stderr() and s.sidecar.poll() is None
        for _ in range(4):
            assert _post(s, "/v1/chat/completions", "aigw__chat-basic.yaml")["total_tokens"] == 385
