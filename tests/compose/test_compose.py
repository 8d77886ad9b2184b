"""docker-compose.yaml, running in Docker, tested from the host through its published ports.

Official OpenAI SDK traffic through the Envoy container (non-streaming, streaming, an aborted
stream; each with a JWT whose `team` claim Envoy verifies), then what came out of the containers:
Envoy's access log, Prometheus' HTTP API after a scrape of the sidecar, spans at the OTLP receiver,
the health checks, and last a `docker-compose stop` of the sidecar while a stream is in flight.
The tests run in file order; the last one stops the sidecar.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from tests.compose.compose_stack import (
    ENABLED,
    ENVOY,
    ENVOY_ADMIN,
    JAEGER,
    METRICS,
    PROMETHEUS,
    Compose,
    http_get,
    wait_until,
)
from tests.support import jwt_keys

pytestmark = [
    pytest.mark.compose,
    pytest.mark.skipif(not ENABLED, reason="runs in Docker: `make test-compose` (tests/compose/run.sh)"),
]


@dataclass
class Sent:
    rid: str
    team: str
    user: str
    prompt: int  # tokens the mock reports: words in the messages
    completion: int  # x-mock-words
    stream: bool
    aborted: bool = False
    text: str = ""
    usage: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def client(team: str, user: str) -> openai.OpenAI:
    # The JWT is the API key: the SDK sends it as `Authorization: Bearer ...`, Envoy's jwt_authn
    # verifies it and forwards its claims to the sidecar.
    return openai.OpenAI(base_url=f"{ENVOY}/v1", api_key=jwt_keys.token(user, team), max_retries=0, timeout=60)


def headers(rid: str, words: int, chunk_ms: int | None = None) -> dict[str, str]:
    h = {"x-request-id": rid, "x-mock-words": str(words)}
    if chunk_ms is not None:
        h["x-mock-chunk-ms"] = str(chunk_ms)
    return h


@pytest.fixture(scope="session")
def traffic(stack: Compose) -> dict[str, Sent]:
    sent: dict[str, Sent] = {}

    # non-streaming, team alpha: 3 prompt words, 7 completion words
    s = Sent(str(uuid.uuid4()), "alpha", "alice", prompt=3, completion=7, stream=False)
    r = client(s.team, s.user).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello compose world"}], extra_headers=headers(s.rid, 7)
    )
    s.text, s.usage = r.choices[0].message.content or "", r.usage
    sent["plain"] = s

    # streaming with usage, team beta: 4 prompt words, 9 completion words
    s = Sent(str(uuid.uuid4()), "beta", "bob", prompt=4, completion=9, stream=True)
    chunks = client(s.team, s.user).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count these four words"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers(s.rid, 9),
    )
    for chunk in chunks:
        if chunk.choices:
            s.text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            s.usage = chunk.usage
    sent["stream"] = s

    # aborted stream, team gamma: 200 words at 50 ms each; the client leaves after 3 chunks
    s = Sent(str(uuid.uuid4()), "gamma", "carol", prompt=2, completion=200, stream=True, aborted=True)
    chunks = client(s.team, s.user).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "never mind"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers(s.rid, 200, chunk_ms=50),
    )
    for i, _chunk in enumerate(chunks):
        if i == 2:
            break
    chunks.response.close()
    sent["aborted"] = s
    return sent


def words(text: str) -> int:
    return len(text.split())


# ---- the SDK's view ----------------------------------------------------------------------------
def test_sdk_responses(traffic):
    plain, stream = traffic["plain"], traffic["stream"]
    assert words(plain.text) == 7 and plain.usage.prompt_tokens == 3 and plain.usage.completion_tokens == 7
    assert words(stream.text) == 9 and stream.usage.prompt_tokens == 4 and stream.usage.completion_tokens == 9


# ---- health -----------------------------------------------------------------------------------
def test_health_checks(stack):
    state = stack.inspect("extproc")["State"]
    assert state["Health"]["Status"] == "healthy", state["Health"]
    assert all(h["ExitCode"] == 0 for h in state["Health"]["Log"][-1:]), state["Health"]["Log"]
    assert http_get(f"{ENVOY_ADMIN}/ready") == (200, b"LIVE\n")
    assert http_get(f"{METRICS}/healthz")[0] == 200
    # The sidecar is the container's PID 1 (exec form), so `docker stop` signals it directly.
    p = stack.run("exec", "-T", "extproc", "cat", "/proc/1/cmdline")
    argv = p.stdout.split("\0")
    assert any(a.endswith("/extproc") for a in argv[:2]) and "serve" in argv, argv  # [python,] extproc serve ...


# ---- Envoy's access log ----------------------------------------------------------------------
def log_entry(stack: Compose, rid: str) -> dict[str, Any]:
    return wait_until(f"access log line for {rid}", lambda: next((e for e in stack.access_log() if e.get("request_id") == rid), None), 15)


def test_access_log_tokens(stack, traffic):
    for key in ("plain", "stream"):
        s = traffic[key]
        e = log_entry(stack, s.rid)
        assert e["response_code"] == 200 and e["path"] == "/v1/chat/completions"
        assert (e["team"], e["user"]) == (s.team, s.user), e  # verified JWT claims
        assert e["model"] == "gpt-4o-mini" and e["provider"] == "openai", e
        assert e["streaming"] is s.stream, e
        assert (e["prompt_tokens"], e["completion_tokens"], e["total_tokens"]) == (s.prompt, s.completion, s.prompt + s.completion), e
        assert e["upstream_name"] == "llm_mock_llm_8000"


def test_access_log_aborted_stream(stack, traffic):
    s = traffic["aborted"]
    e = log_entry(stack, s.rid)
    assert e["team"] == "gamma" and e["streaming"] is True, e  # the sidecar saw the request
    assert e["total_tokens"] is None and e["completion_tokens"] is None, e  # no usage before the client left


# ---- Prometheus --------------------------------------------------------------------------------
def query(expr: str) -> dict[str, float]:
    status, body = http_get(f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    data = json.loads(body)["data"]["result"]
    return {r["metric"].get("team", ""): float(r["value"][1]) for r in data}


def test_prometheus_targets_up(stack, traffic):
    def up() -> dict[str, str] | None:
        body = json.loads(http_get(f"{PROMETHEUS}/api/v1/targets")[1])
        health = {t["labels"]["job"]: t["health"] for t in body["data"]["activeTargets"]}
        return health if health == {"extproc": "up", "envoy": "up"} else None

    wait_until("Prometheus targets extproc and envoy up", up, 45)


def test_prometheus_per_team_totals(stack, traffic):
    """After a scrape (every 15 s), the per-team queries give the exact sums of what was sent."""
    plain, stream = traffic["plain"], traffic["stream"]
    want_prompt = {"alpha": plain.prompt, "beta": stream.prompt}
    want_completion = {"alpha": plain.completion, "beta": stream.completion}
    want_total = {t: want_prompt[t] + want_completion[t] for t in want_prompt}
    wait_until(
        "per-team token totals in Prometheus",
        lambda: query("sum by (team) (ai_prompt_tokens_total) + sum by (team) (ai_completion_tokens_total)") == want_total,
        60,
        1,
    )
    assert query("sum by (team) (ai_prompt_tokens_total)") == want_prompt
    assert query("sum by (team) (ai_completion_tokens_total)") == want_completion
    outcomes = 'sum by (team) (ai_requests_total{outcome="%s"})'
    assert query(outcomes % "ok") == {"alpha": 1, "beta": 1}
    wait_until("the aborted stream counted once, as client_abort", lambda: query(outcomes % "client_abort") == {"gamma": 1}, 30, 1)


# ---- traces -----------------------------------------------------------------------------------
def spans() -> list[dict[str, Any]]:
    body = json.loads(http_get(f"{JAEGER}/api/traces?" + urllib.parse.urlencode({"service": "envoy-ai-extproc", "limit": 100}))[1])
    out = []
    for t in body["data"]:
        for s in t["spans"]:
            out.append({"name": s["operationName"], **{tag["key"]: tag["value"] for tag in s["tags"]}})
    return out


def test_spans_arrived(stack, traffic):
    plain, stream = traffic["plain"], traffic["stream"]

    def got() -> list[dict[str, Any]] | None:
        found = [s for s in spans() if s.get("gen_ai.request.model") == "gpt-4o-mini"]
        return found if len(found) >= 3 else None

    found = wait_until("3 spans from the sidecar at the OTLP receiver", got, 30)
    usage = sorted(
        (s.get("gen_ai.usage.input_tokens"), s.get("gen_ai.usage.output_tokens"))
        for s in found
        if s.get("gen_ai.usage.input_tokens") is not None
    )
    assert usage == sorted([(plain.prompt, plain.completion), (stream.prompt, stream.completion)]), found
    assert all(s.get("gen_ai.operation.name") == "chat" and s.get("gen_ai.provider.name") == "openai" for s in found), found


# ---- graceful shutdown: last (it stops the sidecar) -------------------------------------------
def test_stop_lets_inflight_stream_finish(stack, traffic):
    """`docker-compose stop extproc` while a 6 s stream is in flight: SIGTERM reaches the sidecar
    (PID 1), which stops taking new streams but observes this one to the end, then exits 0."""
    rid, team, n = str(uuid.uuid4()), "delta", 60
    text, usage, errors = [], [], []
    first_chunk = threading.Event()

    def consume() -> None:
        try:
            chunks = client(team, "dave").chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "a long answer please"}],
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=headers(rid, n, chunk_ms=100),
            )
            for chunk in chunks:
                first_chunk.set()
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                if chunk.usage is not None:
                    usage.append(chunk.usage)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            first_chunk.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first_chunk.wait(30)
    t0 = time.monotonic()
    stack.run("stop", "extproc", timeout=60)
    stopped_after = time.monotonic() - t0
    reader.join(60)
    assert not errors, errors
    assert words("".join(text)) == n and usage and usage[0].completion_tokens == n
    state = stack.inspect("extproc")["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state  # not SIGKILLed (137) at the grace period
    assert stopped_after < 30, f"docker-compose stop took {stopped_after:.1f}s (stop_grace_period 30s)"
    # The sidecar kept observing the stream while draining: its tokens are in Envoy's access log.
    e = log_entry(stack, rid)
    assert (e["team"], e["completion_tokens"], e["total_tokens"]) == (team, n, 4 + n), e
