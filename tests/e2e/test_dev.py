"""`extproc dev` (what `make run` runs) keeps its command-line contract."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import yaml

from extproc.devtools.dev import free_port, wait_port
from tests.support.jwt_keys import jwks_json, token

pytestmark = pytest.mark.integration


def _dev(tmp_path, *args: str) -> tuple[subprocess.Popen, dict]:
    ports = {"port": free_port(), "metrics": free_port(), "admin": free_port(), "sidecar": free_port()}
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{ports['sidecar']}"}))
    cmd = [sys.executable, "-m", "extproc", "dev", "--port", str(ports["port"]), "--metrics-port", str(ports["metrics"]),
           "--admin-port", str(ports["admin"]), "--config", str(cfg), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ports


def test_dev_stack_with_upstream_jwks_and_access_log(tmp_path, replay):
    (tmp_path / "jwks.json").write_text(jwks_json())
    log = tmp_path / "access.log"
    proc, ports = _dev(tmp_path, "--upstream", replay.url, "--jwks", str(tmp_path / "jwks.json"), "--access-log", str(log))
    try:
        wait_port(ports["port"], timeout=30, proc=proc)
        rid = str(uuid.uuid4())
        r = httpx.post(f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
                       content=b'{"model":"gpt-5-nano","messages":[{"role":"user","content":"Hello!"}]}',
                       headers={"x-fixture": "aigw__chat-basic.yaml", "x-request-id": rid,
                                "authorization": f"Bearer {token('alice', 'dev')}"}, timeout=20)
        assert r.status_code == 200
        # a token that does not verify still passes (observability never gates traffic), without claims
        r2 = httpx.post(f"http://127.0.0.1:{ports['port']}/v1/chat/completions", content=b'{"model":"x"}',
                        headers={"x-fixture": "aigw__chat-basic.yaml", "authorization": "Bearer sk-not-a-jwt"}, timeout=20)
        assert r2.status_code == 200
        deadline = time.monotonic() + 10
        entry = None
        while entry is None and time.monotonic() < deadline:
            for line in log.read_text().splitlines() if log.exists() else []:
                if json.loads(line)["request_id"] == rid:
                    entry = json.loads(line)
            time.sleep(0.05)
        assert entry is not None
        assert (entry["user"], entry["team"], entry["total_tokens"]) == ("alice", "dev", 385)
        assert (replay.requests[-2][0]) == "/v1/chat/completions"  # path kept
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "dev stack is up" in err


def test_dev_mock_llm_default_upstream(tmp_path):
    mock = free_port()
    proc, ports = _dev(tmp_path, "--mock-port", str(mock))
    try:
        wait_port(ports["port"], timeout=30, proc=proc)
        r = httpx.post(f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}, timeout=20)
        assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}
        time.sleep(0.4)  # access log flush interval is 100 ms
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    line = json.loads(out.strip().splitlines()[-1])  # access log on stdout by default
    assert line["total_tokens"] == 14 and line["model"] == "gpt-4o-mini"


def test_port_taken_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        proc, _ = _dev(tmp_path, "--mock-port", str(taken))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert f"port {taken}" in err and "already in use" in err
