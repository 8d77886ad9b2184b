"""`extproc dev` (what `make run` runs) keeps its command-line contract."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.devtools.dev import free_port, wait_port
from tests.support.harness import json_lines
from tests.support.jwt_keys import jwks_json, token

pytestmark = pytest.mark.integration


def _dev(tmp_path, *args: str) -> tuple[subprocess.Popen, dict]:
    ports = {"port": free_port(), "metrics": free_port(), "admin": free_port(), "sidecar": free_port()}
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{ports['sidecar']}"}))
    cmd = [
        sys.executable,
        "-m",
        "extproc",
        "dev",
        "--port",
        str(ports["port"]),
        "--metrics-port",
        str(ports["metrics"]),
        "--admin-port",
        str(ports["admin"]),
        "--config",
        str(cfg),
        *args,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ports


def test_dev_stack_with_upstream_jwks_and_access_log(tmp_path, replay):
    (tmp_path / "jwks.json").write_text(jwks_json())
    log = tmp_path / "access.log"
    proc, ports = _dev(tmp_path, "--upstream", replay.url, "--jwks", str(tmp_path / "jwks.json"), "--access-log", str(log))
    try:
        wait_port(ports["port"], timeout=30, proc=proc)
        rid = str(uuid.uuid4())
        r = httpx.post(
            f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
            content=b'{"model":"gpt-5-nano","messages":[{"role":"user","content":"Hello!"}]}',
            headers={"x-fixture": "aigw__chat-basic.yaml", "x-request-id": rid, "authorization": f"Bearer {token('alice', 'dev')}"},
            timeout=20,
        )
        assert r.status_code == 200
        # a token that does not verify still passes (observability never gates traffic), without claims
        r2 = httpx.post(
            f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
            content=b'{"model":"x"}',
            headers={"x-fixture": "aigw__chat-basic.yaml", "authorization": "Bearer sk-not-a-jwt"},
            timeout=20,
        )
        assert r2.status_code == 200
        deadline = time.monotonic() + 10
        entry = None
        while entry is None and time.monotonic() < deadline:
            entry = next((e for e in json_lines(log) if e["request_id"] == rid), None)
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
        r = httpx.post(
            f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]},
            timeout=20,
        )
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


def _descendants(root: int) -> set[int]:
    """Every live process under ``root`` (from /proc: children in their own sessions included)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            parent[int(d)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_backgrounded_dev_stops_on_sigint_binds_loopback_only_and_cleans_up(tmp_path):
    """Started the way `cmd &` in a non-interactive shell starts it (SIGINT inherited as ignored):
    SIGINT still stops the whole stack within seconds, exit 0, no traceback, no process and no
    temporary directory left; meanwhile every listener of the stack is on 127.0.0.1."""
    mock = free_port()
    ports = {"port": free_port(), "metrics": free_port(), "admin": free_port(), "sidecar": free_port()}
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{ports['sidecar']}"}))
    cmd = [
        sys.executable,
        "-m",
        "extproc",
        "dev",
        "--port",
        str(ports["port"]),
        "--metrics-port",
        str(ports["metrics"]),
        "--admin-port",
        str(ports["admin"]),
        "--config",
        str(cfg),
        "--mock-port",
        str(mock),
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    try:
        wait_port(ports["port"], timeout=30, proc=proc)
        wait_port(ports["metrics"], timeout=10)
        stack = _descendants(proc.pid)
        assert len(stack) >= 5  # mock-llm, serve + 2 workers, envoy
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
        ours = [line for line in listening if {int(p) for p in re.findall(r"pid=(\d+)", line)} & stack]
        addresses = {line.split()[3] for line in ours}
        assert {f"127.0.0.1:{p}" for p in (*ports.values(), mock)} <= addresses
        assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert elapsed < 10
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert not [pid for pid in stack if _alive(pid)], "children left running"
    (envoy_yaml,) = re.findall(r"\(config (\S+/envoy\.yaml)\)", err)
    assert Path(envoy_yaml).parent.name.startswith("extproc-dev-")
    assert not Path(envoy_yaml).parent.exists(), "temporary directory left behind"


def test_sigterm_while_starting_exits_0_and_cleans_up(tmp_path):
    """A stop requested before the stack is up is honoured too: no child and no temporary
    directory left, exit 0."""
    mock = free_port()
    proc, ports = _dev(tmp_path, "--mock-port", str(mock))
    try:
        wait_port(mock, timeout=30, proc=proc)  # the first child is up, the others may not be
        (workdir,) = [
            d
            for d in Path(tempfile.gettempdir()).glob("extproc-dev-*")
            if (d / "envoy.yaml").is_file() and f"port_value: {ports['port']}" in (d / "envoy.yaml").read_text()
        ]
        stack = _descendants(proc.pid)
        assert stack
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert not [pid for pid in stack if _alive(pid)], "children left running"
    assert not workdir.exists(), "temporary directory left behind"


def test_dev_sidecar_does_not_import_modules_from_the_cwd(tmp_path):
    """The sidecar `extproc dev` starts imports nothing from the current directory (`python -m
    extproc` would put it first on sys.path, and a json.py there would replace the standard
    library's)."""
    marker = tmp_path / "shadow-imported"
    (tmp_path / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('shadowed json imported')\n")
    ports = {"port": free_port(), "metrics": free_port(), "admin": free_port(), "sidecar": free_port()}
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{ports['sidecar']}"}))
    script = Path(sys.executable).parent / "extproc"  # the console script: its own sys.path[0] is bin/
    proc = subprocess.Popen(
        [
            str(script),
            "dev",
            "--port",
            str(ports["port"]),
            "--metrics-port",
            str(ports["metrics"]),
            "--admin-port",
            str(ports["admin"]),
            "--mock-port",
            str(free_port()),
            "--config",
            str(cfg),
            "--access-log",
            str(tmp_path / "access.log"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(ports["port"], timeout=30, proc=proc)
        r = httpx.post(
            f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
            timeout=20,
            content=b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
        )
        assert r.status_code == 200
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert not marker.exists(), err[-2000:]


def test_dev_observability_mode_observes_calls_on_metrics_not_in_the_access_log(tmp_path):
    """`--mode observability`: Envoy does not wait for the sidecar and ignores its replies. The call
    is still observed (its tokens on /metrics), and, as the mode's --help says, the access log
    carries no token fields."""
    mock = free_port()
    log = tmp_path / "access.log"
    proc, ports = _dev(tmp_path, "--mock-port", str(mock), "--mode", "observability", "--access-log", str(log))
    try:
        wait_port(ports["port"], timeout=30, proc=proc)
        rid = str(uuid.uuid4())
        r = httpx.post(
            f"http://127.0.0.1:{ports['port']}/v1/chat/completions",
            headers={"x-request-id": rid},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]},
            timeout=20,
        )
        assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}
        completion = re.compile(r'^ai_completion_tokens_total\{[^}]*model="gpt-4o-mini"[^}]*\} (\S+)$', re.M)
        deadline, seen = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            m = completion.search(httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).text)
            if m and float(m.group(1)) == 12:
                seen = float(m.group(1))
                break
            time.sleep(0.1)
        assert seen == 12
        entry = None
        while entry is None and time.monotonic() < deadline + 5:
            entry = next((e for e in json_lines(log) if e["request_id"] == rid), None)
            time.sleep(0.05)
        assert entry is not None and entry["response_code"] == 200
        assert entry["total_tokens"] is None and entry["model"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "Observability mode" in err  # the banner says where the tokens are
