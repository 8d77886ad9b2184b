"""Metrics end to end: real Envoy + jwt_authn + the sidecar + the mock LLM, scraped directly and
through a real Prometheus server. Expected numbers are the usage the client itself received."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from extproc.devtools.dev import free_port, wait_port
from tests.support import jwt_keys
from tests.support.harness import REPO, Stack, scrape, total

pytestmark = pytest.mark.integration

STATS = {
    "address": "127.0.0.1",
    "customLabels": [
        {"name": "team", "metadataKey": "principal:team"},
        {"name": "user_id", "metadataKey": "principal:sub", "metadataNamespace": "envoy.filters.http.jwt_authn"},
    ],
}
USERS = {"alice": "dev", "bob": "ops"}
# A loaded test machine can take longer than the production 500 ms per message; Envoy then fails
# open and the call goes unobserved (by design), so exact totals need a patient Envoy here.
PATIENT = {"message_timeout_ms": 5000}


@pytest.fixture(scope="module")
def mock(mock_llm: str) -> str:
    return mock_llm


# ---- traffic ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    user: str
    model: str
    stream: bool
    prompt: int  # usage as the client received it
    completion: int


def chat(stack: Stack, user: str | None, model: str, stream: bool, prompt_words: int, reply_words: int) -> Sent:
    body: dict = {"model": model, "messages": [{"role": "user", "content": " ".join(["word"] * prompt_words)}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"x-mock-words": str(reply_words), "x-mock-chunk-ms": "1"}
    if user is not None:
        headers["authorization"] = "Bearer " + jwt_keys.token(user, USERS[user])
    r = httpx.post(stack.url("/v1/chat/completions"), json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usage = events[-1]["usage"]
    else:
        usage = r.json()["usage"]
    return Sent(user or "", model, stream, usage["prompt_tokens"], usage["completion_tokens"])


def mixed_traffic(stack: Stack) -> list[Sent]:
    plan = []
    for i in range(6):
        for user in ("alice", "bob"):
            plan.append((user, "gpt-4o-mini" if i % 3 else "gpt-4o", i % 2 == 0, 3 + i + len(user), 5 + 2 * i))
    plan.append((None, "gpt-4o-mini", False, 4, 6))  # no token: empty team/user labels
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: chat(stack, *p), plan))


# ---- scraping -----------------------------------------------------------------------------------
def scrape_after(port: int, calls: int, timeout: float = 15, stack: Stack | None = None) -> list[tuple[str, dict[str, str], float]]:
    """A scrape once all ``calls`` were recorded (the observer runs when the ext_proc stream ends,
    a moment after the client has its response)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        seen = total(samples, "ai_requests_total")
        if seen >= calls or time.monotonic() > deadline:
            envoy = (
                {k: stack.envoy_stat(f"http.llm.ext_proc.{k}") for k in ("streams_started", "failure_mode_allowed", "message_timeouts")}
                if stack
                else {}
            )
            assert seen == calls, f"recorded {seen} calls, sent {calls}; {_outcomes(samples)}; Envoy ext_proc {envoy}"
            return samples
        time.sleep(0.1)


def _outcomes(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    return {f"{l['outcome']}/{l['status_code']}/{l['error_type']}": v for n, l, v in samples if n == "ai_requests_total"}


# ---- one worker ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory, mock) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("metrics"), mock, sidecar_config={"stats": STATS}, jwks_json=jwt_keys.jwks_json(), **PATIENT) as s:
        yield s


@pytest.fixture(scope="module")
def traffic(stack) -> list[Sent]:
    return mixed_traffic(stack)


def test_token_counters_per_team_are_exact(stack, traffic):
    samples = scrape_after(stack.metrics_port, len(traffic), stack=stack)
    assert {s.stream for s in traffic} == {True, False}
    for user, team in USERS.items():
        for model in ("gpt-4o", "gpt-4o-mini"):
            mine = [s for s in traffic if s.user == user and s.model == model]
            labels = {"llm": "openai", "model": model, "team": team, "user_id": user}
            assert total(samples, "ai_prompt_tokens_total", **labels) == sum(s.prompt for s in mine) > 0
            assert total(samples, "ai_completion_tokens_total", **labels) == sum(s.completion for s in mine) > 0
    anon = [s for s in traffic if s.user == ""]
    assert total(samples, "ai_prompt_tokens_total", team="", user_id="") == sum(s.prompt for s in anon)
    assert total(samples, "ai_requests_total", outcome="ok", status_code="200", operation="chat") == len(traffic)
    assert total(samples, "ai_usage_missing_total") == 0


def test_histograms_per_user(stack, traffic):
    samples = scrape_after(stack.metrics_port, len(traffic), stack=stack)
    for user in USERS:
        mine = [s for s in traffic if s.user == user]
        for kind, attr in (("input", "prompt"), ("output", "completion")):
            got = total(
                samples,
                "gen_ai_client_token_usage_sum",
                gen_ai_token_type=kind,
                user_id=user,
                gen_ai_provider_name="openai",
                gen_ai_operation_name="chat",
            )
            assert got == sum(getattr(s, attr) for s in mine)
            assert total(samples, "gen_ai_client_token_usage_count", gen_ai_token_type=kind, user_id=user) == len(mine)
        streams = [s for s in mine if s.stream]
        assert total(samples, "gen_ai_server_time_to_first_token_seconds_count", user_id=user, error_type="") == len(streams)
        assert total(samples, "gen_ai_server_time_per_output_token_seconds_count", user_id=user) == len(streams)
        assert total(samples, "gen_ai_client_operation_duration_seconds_count", user_id=user, error_type="") == len(mine)
    assert total(samples, "gen_ai_client_operation_duration_seconds_bucket", le="+Inf") == len(traffic)


def test_healthz(stack):
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/healthz", timeout=5) as r:
        assert r.status == 200


# ---- a real Prometheus server ----------------------------------------------------------------------
def prom_query(port: int, q: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path, stack) -> Iterator[int]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):  # CI installs it (`make test` runs `make tools`): missing is a failure
            pytest.fail("no prometheus binary on PATH in CI; `make tools` should have installed it")
        pytest.skip("no prometheus binary: run `make tools` (apt-get install prometheus)")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "extproc", "static_configs": [{"targets": [f"127.0.0.1:{stack.metrics_port}"]}]}],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=log,
    )
    try:
        wait_port(port, proc=proc, timeout=30)
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


def test_prometheus_server_sums_per_team_and_user(stack, traffic, prometheus):
    scrape_after(stack.metrics_port, len(traffic), stack=stack)  # recorded before Prometheus' next scrape
    by_team = "sum by (team) (ai_prompt_tokens_total)"
    by_user = (
        'sum by (user_id) (gen_ai_client_token_usage_sum{gen_ai_token_type="input"}'
        ' + ignoring(gen_ai_token_type) gen_ai_client_token_usage_sum{gen_ai_token_type="output"})'
    )
    want_team = {team: float(sum(s.prompt for s in traffic if USERS.get(s.user) == team)) for team in ("dev", "ops")}
    want_user = {u: float(sum(s.prompt + s.completion for s in traffic if s.user == u)) for u in USERS}
    deadline = time.monotonic() + 30
    while True:
        teams = {r["metric"].get("team", ""): float(r["value"][1]) for r in prom_query(prometheus, by_team)}
        users = {r["metric"].get("user_id", ""): float(r["value"][1]) for r in prom_query(prometheus, by_user)}
        if (teams.get("dev"), teams.get("ops")) == (want_team["dev"], want_team["ops"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {t: teams.get(t) for t in want_team} == want_team
    assert {u: users.get(u) for u in want_user} == want_user
    assert teams.get("") == sum(s.prompt for s in traffic if s.user == "")


# ---- several workers ---------------------------------------------------------------------------------
def test_two_workers_one_scrape_sums_both(tmp_path, mock, monkeypatch):
    mpdir = tmp_path / "prom-mp"
    mpdir.mkdir()
    (mpdir / "counter_99999.db").write_bytes(b"stale file from an earlier run")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mpdir))
    with Stack(
        tmp_path / "stack",
        mock,
        sidecar_config={"stats": STATS},
        jwks_json=jwt_keys.jwks_json(),
        workers=2,
        envoy_concurrency=8,
        extproc_streams_per_connection=1,
        **PATIENT,
    ) as stack:
        # One stream per ext_proc connection: the 16 concurrent calls need 16+ connections, which
        # SO_REUSEPORT hashes over both workers (with 8 connections, all on one worker happened
        # in CI: 1 in 128).
        assert not (mpdir / "counter_99999.db").exists()  # cleaned at start-up
        listening = stack.listening_pids()
        plan = [(("alice", "bob")[i % 2], "gpt-4o-mini", i % 3 == 0, 2 + i % 7, 3 + i % 5) for i in range(64)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            sent = list(pool.map(lambda p: chat(stack, *p), plan))
        samples = scrape_after(stack.metrics_port, len(sent), stack=stack)
        for user, team in USERS.items():
            mine = [s for s in sent if s.user == user]
            labels = {"llm": "openai", "model": "gpt-4o-mini", "team": team}
            assert total(samples, "ai_prompt_tokens_total", **labels) == sum(s.prompt for s in mine)
            assert total(samples, "ai_completion_tokens_total", **labels) == sum(s.completion for s in mine)
            assert total(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="input", user_id=user) == len(mine)
        # Both workers did some of the work: each writes its own <type>_<pid>.db files.
        pids = Tally(p.stem.rsplit("_", 1)[1] for p in mpdir.glob("counter_*.db"))
        assert len(pids) == 2, f"calls reached {len(pids)} worker(s): {sorted(pids)} of {listening}"

        # A worker that dies loses nothing: its files still count, its replacement adds to them.
        workers = [int(p) for p in pids]
        before = stack.listening_pids()
        os.kill(workers[0], 9)
        # Until the replacement listens: the dead worker stays a child (a zombie) until the
        # supervisor reaps it, so a count of children alone can end this wait at once, and calls
        # sent then could meet Envoy's connections to the dead worker (failing open, unobserved).
        replacement = stack.wait_listening(len(before) + 1, timeout=10) - before
        assert replacement and workers[0] not in _children(stack.sidecar.pid), (replacement, _children(stack.sidecar.pid))
        more = [chat(stack, "alice", "gpt-4o-mini", False, 5, 5) for _ in range(8)]
        samples = scrape_after(stack.metrics_port, len(sent) + len(more), stack=stack)
        assert total(samples, "ai_prompt_tokens_total", team="dev") == sum(s.prompt for s in sent + more if s.user == "alice")

        # A restarted sidecar starts from zero: the previous run's files do not leak into totals.
        stack.stop_sidecar()
        stack.start_sidecar()
        wait_port(stack.metrics_port)
        one = chat(stack, "bob", "gpt-4o-mini", False, 3, 4)
        samples = scrape_after(stack.metrics_port, 1)
        assert total(samples, "ai_prompt_tokens_total") == one.prompt


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


# ---- start-up checks -----------------------------------------------------------------------------------
def test_bad_custom_label_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stats:\n  customLabels:\n    - name: model\n      metadataKey: principal:sub\n")
    r = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert "stats.customLabels.0.name" in r.stderr and len(r.stderr.strip().splitlines()) == 1
