"""Health service and graceful shutdown, on the real topology (Envoy + sidecar + replay upstream).

SIGTERM while an LLM stream is in flight: the sidecar turns NOT_SERVING, refuses new streams
(Envoy fails open for them), keeps observing the stream in flight until it ends, reports it (the
tokens reach Envoy's access log, the observers run) and exits 0.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.devtools.dev import free_port
from tests.support.harness import Stack
from tests.support.recordings import load

pytestmark = pytest.mark.integration

STREAM = "aigw__chat-streaming-detailed-usage.yaml"  # 12 + 100 = 112 tokens, in its last event


def _health_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc", "health", *args], capture_output=True, text=True, timeout=30)


def _calls_logged(stack: Stack) -> list[dict]:
    """The observer output: CallLog's debug line per finished call, from the sidecar's stderr."""
    out = []
    for line in stack.sidecar_stderr().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") == "extproc.calls":
            out.append(rec)
    return out


def test_health_cli_serving_and_down(tmp_path, replay):
    with Stack(tmp_path, replay.url) as s:
        addr = f"127.0.0.1:{s.sidecar_port}"
        p = _health_cli("--address", addr)
        assert p.returncode == 0 and p.stdout.strip() == "SERVING", p.stderr
        p = _health_cli("--address", addr, "--service", "envoy.service.ext_proc.v3.ExternalProcessor")
        assert p.returncode == 0, p.stderr
        p = _health_cli("--config", str(s.sidecar_config_path))  # the address read from 'listen'
        assert p.returncode == 0, p.stderr
        p = _health_cli("--address", addr, "--service", "no.such.Service")
        assert p.returncode == 1 and "NOT_FOUND" in p.stderr
        assert s.stop_sidecar() == 0
        p = _health_cli("--address", addr, "--timeout", "1")
        assert p.returncode == 1 and "UNAVAILABLE" in p.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_the_stream_in_flight_finish(tmp_path, replay, workers):
    rec = load(STREAM)
    health_port = free_port()
    sidecar = {"shutdownGraceSeconds": 15, "logging": {"level": "debug"}, "healthListen": f"127.0.0.1:{health_port}"}
    with Stack(tmp_path, replay.url, sidecar_config=sidecar, workers=workers) as s:
        assert _health_cli("--address", f"127.0.0.1:{health_port}").returncode == 0
        channel = grpc.insecure_channel(f"127.0.0.1:{s.sidecar_port}")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        gate, rid = str(uuid.uuid4()), str(uuid.uuid4())
        headers = {"content-type": "application/json", "x-fixture": rec.name, "x-gate": gate, "x-request-id": rid}
        with httpx.stream("POST", s.url(rec.path), content=rec.request_body, headers=headers, timeout=30) as r:
            chunks = r.iter_raw()
            first = next(chunks)  # the stream is in flight: Envoy holds an ext_proc stream open
            if workers == 1:  # (with 2 workers the Watch may sit on the other worker: still fine)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            s.sidecar.send_signal(signal.SIGTERM)
            if workers == 1:
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            channel.close()
            time.sleep(0.3)
            assert s.sidecar.poll() is None, "exited with a stream in flight"
            assert _health_cli("--address", f"127.0.0.1:{s.sidecar_port}", "--timeout", "1").returncode == 1
            if workers == 1:  # the healthListen port still answers while draining: NOT_SERVING
                p = _health_cli("--address", f"127.0.0.1:{health_port}", "--timeout", "1")
                assert p.returncode == 1 and p.stderr.strip() == "NOT_SERVING"

            # A request that starts while draining is served (fail open), just not observed.
            rid2 = str(uuid.uuid4())
            late = httpx.post(
                s.url(rec.path),
                content=rec.request_body,
                headers={"content-type": "application/json", "x-fixture": rec.name, "x-request-id": rid2},
                timeout=30,
            )
            assert late.status_code == 200 and late.content == rec.body
            assert s.log_entry(rid2)["total_tokens"] is None

            replay.open_gate(gate)
            rest = b"".join(chunks)
        assert first + rest == rec.body  # the client got every byte
        entry = s.log_entry(rid)
        assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (12, 100, 112)
        assert s.sidecar.wait(10) == 0  # well before the 15 s grace: it left once the stream ended
    calls = [c for c in _calls_logged(s) if c.get("output_tokens") == 100]
    assert len(calls) == 1 and calls[0]["outcome"] == "ok"  # the observers ran before exit
    assert "Traceback" not in s.sidecar_stderr()


def test_grace_period_expiry_cancels_and_still_reports(tmp_path, replay):
    """A stream outliving the grace period is cut from the sidecar (not from the client: Envoy
    fails open), its call is still reported, and the sidecar exits 0 soon after the deadline."""
    rec = load(STREAM)
    sidecar = {"shutdownGraceSeconds": 1, "logging": {"level": "debug"}}
    with Stack(tmp_path, replay.url, sidecar_config=sidecar) as s:
        gate, rid = str(uuid.uuid4()), str(uuid.uuid4())
        headers = {"content-type": "application/json", "x-fixture": rec.name, "x-gate": gate, "x-request-id": rid}
        with httpx.stream("POST", s.url(rec.path), content=rec.request_body, headers=headers, timeout=30) as r:
            chunks = r.iter_raw()
            first = next(chunks)
            t0 = time.monotonic()
            s.sidecar.send_signal(signal.SIGTERM)
            assert s.sidecar.wait(10) == 0
            assert time.monotonic() - t0 < 8
            replay.open_gate(gate)
            rest = b"".join(chunks)
        assert first + rest == rec.body
        assert r.status_code == 200
        s.log_entry(rid)
    calls = _calls_logged(s)
    assert len(calls) == 1 and calls[0]["model"] == "gpt-5-nano", s.sidecar_stderr()[-2000:]
    # The gate held everything after the first event, so the sidecar was cut before the usage
    # arrived: reported once, as an abandoned stream, with no tokens invented.
    assert calls[0]["output_tokens"] is None and calls[0]["outcome"] == "client_abort"
