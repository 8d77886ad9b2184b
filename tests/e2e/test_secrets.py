"""No secret leaks: with credentials in every usual header (and gateway headers
found by name pattern), the query string and a
request body's auth field, nothing the sidecar emits contains them: not its log lines (at debug
level), not an exported span (content capture on, and a field that tries to copy all request
headers), not a metric, not our dynamic metadata, not Envoy's access log line built from it.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.support.harness import Stack
from tests.support.otlp_receiver import GrpcReceiver
from tests.support.recordings import load

pytestmark = pytest.mark.integration

SECRETS = {
    "authorization": "Bearer sk-SECRET-authorization-0001",
    "x-api-key": "SECRET-x-api-key-0002",
    "api-key": "SECRET-azure-api-key-0003",
    "cookie": "session=SECRET-cookie-0004",
    "x-goog-api-key": "SECRET-goog-0005",
    "proxy-authorization": "Basic SECRET-proxy-0006",
    # gateway/SDK headers no fixed list knew: redacted by the name pattern
    "x-portkey-api-key": "SECRET-portkey-0009",
    "cf-aig-authorization": "Bearer SECRET-cf-aig-0010",
    "helicone-auth": "Bearer SECRET-helicone-0011",
    "openai-api-key": "SECRET-openai-0012",
    "x-auth-token": "SECRET-auth-token-0013",
    "anthropic-api-key": "SECRET-anthropic-0014",
}
QUERY_SECRET = "SECRET-query-key-0007"
BODY_SECRET = "SECRET-body-api-key-0008"


def test_no_secret_reaches_logs_spans_metrics_or_metadata(tmp_path, replay):
    collector = GrpcReceiver()
    cfg = {
        "logging": {"level": "debug"},
        "stats": {"customLabels": [{"name": "user_id", "header": "x-user-id"}]},
        "tracing": {
            "otlpEndpoint": collector.endpoint,
            "captureContent": True,
            "scheduleDelayMs": 100,
            "fields": {"add": {"hdr": "flatten(request.headers)", "path": "request.path"}},
        },
    }
    try:
        with Stack(tmp_path, replay.url, sidecar_config=cfg) as s:
            calls = [
                ("aigw__chat-basic.yaml", None),
                ("aigw__chat-streaming-detailed-usage.yaml", None),
                ("agw__anthropic__stream_basic.sse", "/v1/messages"),
                ("aigw__azure-chat-basic.yaml", None),
                (
                    "agw__gemini__stream_generate_content_sse.sse",
                    f"/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse&key={QUERY_SECRET}",
                ),
            ]
            for fixture, path in calls:
                rec = load(fixture)
                body = b'{"model":"m","api_key":"' + BODY_SECRET.encode() + b'","messages":[{"role":"user","content":"hi"}]}'
                r = httpx.post(
                    s.url(path or rec.path),
                    content=body,
                    timeout=20,
                    headers={**SECRETS, "x-fixture": fixture, "x-user-id": "u1", "x-request-id": str(uuid.uuid4())},
                )
                assert r.status_code == 200
            collector.wait_for(lambda sp: "generate_content" in sp.name or "gemini" in str(sp.attributes.get("gen_ai.request.model")))
            import time

            deadline = time.monotonic() + 10
            while len(collector.spans) < len(calls) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(collector.spans) >= len(calls)
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5) as m:
                metrics_text = m.read().decode()
            time.sleep(0.3)
            emitted = {
                "sidecar log": s.sidecar_stderr(),
                "spans": collector.all_bytes().decode("utf-8", "replace"),
                "metrics": metrics_text,
                "access log (our metadata and Envoy's fields)": s.access_log.read_text(),
            }
    finally:
        collector.close()
    assert '"level":"debug"' in emitted["sidecar log"]  # the debug call log ran
    assert "u1" in emitted["metrics"] and "hi" in emitted["spans"]  # capture and labels did run
    for where, text in emitted.items():
        for secret in [*SECRETS.values(), QUERY_SECRET, BODY_SECRET]:
            token = secret.split()[-1].split("=")[-1]
            assert token not in text, f"{token} leaked into the {where}"
