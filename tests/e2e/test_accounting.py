"""Exact accounting under concurrency, several workers and aborted clients.

Ground truth is the known usage of the replayed recordings. Three independent outputs must each
add up to it exactly, per team: Envoy's access log (our dynamic metadata), the Prometheus
counters (one scrape over both workers), and the token attributes of the exported spans.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import defaultdict

import pytest

from tests.support.harness import Stack, scrape, total
from tests.support.jwt_keys import jwks_json, token
from tests.support.otlp_receiver import GrpcReceiver
from tests.support.workload import Run, drive

pytestmark = pytest.mark.integration

TOKENS = {"dev": token("alice", "dev"), "ops": token("bob", "ops")}
SIDECAR = {
    "stats": {"customLabels": [{"name": "team", "metadataKey": "principal:team"}]},
    "tracing": {"randomSampling": True, "scheduleDelayMs": 100, "fields": {"add": {"team": "jwt.team"}}},
}


@pytest.fixture(scope="module")
def collector():
    c = GrpcReceiver()
    yield c
    c.close()


@pytest.fixture(scope="module", params=["default", "fewer"])
def stack(request, tmp_path_factory, replay, collector):
    cfg = {**SIDECAR, "tracing": {**SIDECAR["tracing"], "otlpEndpoint": collector.endpoint}}
    with Stack(
        tmp_path_factory.mktemp("acct"),
        replay.url,
        jwks_json=jwks_json(),
        workers=2,
        sidecar_config=cfg,
        fewer_messages=request.param == "fewer",
    ) as s:
        yield s


def _wait(check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def access_log_sums(stack: Stack, run: Run) -> dict[str, dict[str, int]]:
    rids = {r.rid for r in run.results}
    entries = _wait(lambda: (lambda e: e if len(e) >= len(rids) else None)([e for e in stack.log_entries() if e["request_id"] in rids]))
    assert entries is not None and len(entries) == len(rids), "an access-log line per request"
    sums: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt": 0, "completion": 0, "total": 0})
    for e in entries:
        s = sums[e["team"]]
        s["prompt"] += e["prompt_tokens"] or 0
        s["completion"] += e["completion_tokens"] or 0
        s["total"] += e["total_tokens"] or 0
        COST_LOG[e["team"]] += e.get("cost_usd") or 0.0
    return sums


def span_sums(collector: GrpcReceiver, run: Run, before: int) -> dict[str, dict[str, int]]:
    spans = _wait(lambda: collector.spans[before:] if len(collector.spans) - before >= len(run.results) else None)
    assert spans is not None and len(spans) == len(run.results), "a span per call"
    sums: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt": 0, "completion": 0})
    for sp in spans:
        s = sums[sp.attributes.get("team")]
        s["prompt"] += sp.attributes.get("gen_ai.usage.input_tokens", 0)
        s["completion"] += sp.attributes.get("gen_ai.usage.output_tokens", 0)
        COST_SPANS[sp.attributes.get("team")] += sp.attributes.get("gen_ai.usage.cost", 0.0)
    return sums


# USD per team of the run being checked, from the access log and from the spans.
COST_LOG: dict[str, float] = defaultdict(float)
COST_SPANS: dict[str, float] = defaultdict(float)


def check_exact(stack: Stack, collector: GrpcReceiver, run: Run, before_metrics: list, before_spans: int) -> list:
    COST_LOG.clear()
    COST_SPANS.clear()
    log = access_log_sums(stack, run)
    spans = span_sums(collector, run, before_spans)
    calls = total(before_metrics, "ai_requests_total") + len(run.results)
    samples = _wait(lambda: (lambda s: s if total(s, "ai_requests_total") >= calls else None)(scrape(stack.metrics_port)))
    assert samples is not None and total(samples, "ai_requests_total") == calls, "every call recorded once"
    for team in TOKENS:
        want = run.expected(team)
        assert log[team] == want, ("access log", team)
        got = {
            k: total(samples, f"ai_{k}_tokens_total", team=team) - total(before_metrics, f"ai_{k}_tokens_total", team=team)
            for k in ("prompt", "completion")
        }
        assert got == {"prompt": want["prompt"], "completion": want["completion"]}, ("metrics", team)
        assert spans[team] == {"prompt": want["prompt"], "completion": want["completion"]}, ("spans", team)
        # Money too: the access log's cost_usd, ai_cost_usd_total and the spans' gen_ai.usage.cost agree.
        counted = total(samples, "ai_cost_usd_total", team=team) - total(before_metrics, "ai_cost_usd_total", team=team)
        assert COST_LOG[team] > 0, ("nothing priced", team)
        assert abs(counted - COST_LOG[team]) <= 1e-9 * max(1.0, COST_LOG[team]), ("cost: metrics vs access log", team)
        assert abs(COST_SPANS[team] - COST_LOG[team]) <= 1e-9 * max(1.0, COST_LOG[team]), ("cost: spans vs access log", team)
    assert total(samples, "ai_active_streams") == 0  # no per-stream state left behind
    return samples


def test_mixed_workload_concurrency_64_two_workers_is_exact(stack, collector):
    before, nspans = scrape(stack.metrics_port), len(collector.spans)
    run = asyncio.run(drive(stack.url(""), n=280, concurrency=64, tokens=TOKENS))
    assert all(r.error is None and r.status == 200 and r.body_ok for r in run.results), [r.error for r in run.results if r.error][:3]
    check_exact(stack, collector, run, before, nspans)


def test_aborted_clients_counted_once_with_what_was_seen(stack, replay, collector):
    """30% of streaming clients hang up after the first chunk, before the usage is ever sent.
    Each is recorded once, as client_abort, with no tokens; everything else stays exact."""
    before, nspans = scrape(stack.metrics_port), len(collector.spans)
    run = asyncio.run(drive(stack.url(""), n=200, concurrency=64, tokens=TOKENS, abort_ratio=0.3, upstream=replay))
    aborted = [r for r in run.results if r.aborted]
    assert aborted and all(r.error is None for r in run.results)
    samples = check_exact(stack, collector, run, before, nspans)
    assert total(samples, "ai_requests_total", outcome="client_abort") - total(before, "ai_requests_total", outcome="client_abort") == len(
        aborted
    )
    by_rid = {e["request_id"]: e for e in stack.log_entries()}
    assert all(by_rid[r.rid]["total_tokens"] is None for r in aborted)


def test_killed_worker_fails_open_and_is_restarted(stack):
    """SIGKILL a worker under load: no client sees an error (Envoy fails open for the streams it
    held), the other worker keeps counting, and the supervisor starts a replacement."""
    from bench.procstat import tree

    workers = tree(stack.sidecar.pid)[1:]
    assert len(workers) == 2

    async def load_and_kill() -> Run:
        task = asyncio.create_task(drive(stack.url(""), n=300, concurrency=32, tokens=TOKENS, chunk_delay_ms=5))
        await asyncio.sleep(0.3)
        os.kill(workers[0], signal.SIGKILL)
        return await task

    run = asyncio.run(load_and_kill())
    assert all(r.error is None and r.status == 200 and r.body_ok for r in run.results)
    replaced = _wait(lambda: (lambda w: w if len(w) == 2 and workers[0] not in w else None)(tree(stack.sidecar.pid)[1:]))
    assert replaced is not None, "the supervisor restarts the dead worker"
    stack.wait_listening(3)  # two at start-up + the replacement
