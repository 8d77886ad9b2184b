"""Exact accounting under concurrency, several workers and aborted clients (issue 8).

Ground truth is the known usage of the replayed recordings; the access log's token fields must add
up to it exactly, per team.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from harness import Stack
from jwt_keys import jwks_json, token
from workload import drive

pytestmark = pytest.mark.integration

TOKENS = {"dev": token("alice", "dev"), "ops": token("bob", "ops")}


def _log_sums(stack: Stack, rids: set[str], n: int) -> dict[str, dict[str, int]]:
    deadline = time.monotonic() + 15
    while True:
        entries = [e for e in stack.log_entries() if e["request_id"] in rids]
        if len(entries) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(entries) == n, f"{len(entries)} access-log lines for {n} requests"
    sums: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt": 0, "completion": 0, "total": 0})
    for e in entries:
        s = sums[e["team"]]
        s["prompt"] += e["prompt_tokens"] or 0
        s["completion"] += e["completion_tokens"] or 0
        s["total"] += e["total_tokens"] or 0
    return sums


@pytest.fixture(scope="module")
def stack(tmp_path_factory, replay):
    with Stack(tmp_path_factory.mktemp("acct"), replay.url, jwks_json=jwks_json(), workers=2) as s:
        yield s


def test_mixed_workload_concurrency_64_two_workers_is_exact(stack):
    run = asyncio.run(drive(stack.url(""), n=280, concurrency=64, tokens=TOKENS))
    assert all(r.error is None and r.status == 200 and r.body_ok for r in run.results), [r.error for r in run.results if r.error][:3]
    sums = _log_sums(stack, {r.rid for r in run.results}, len(run.results))
    for team in TOKENS:
        assert sums[team] == run.expected(team), team


def test_aborted_clients_count_nothing_twice(stack, replay):
    """10% of streaming clients hang up after the first chunk. Those are logged once with the
    usage seen so far (none: OpenAI-style usage comes last); the rest are exact."""
    run = asyncio.run(drive(stack.url(""), n=200, concurrency=64, tokens=TOKENS, abort_ratio=0.3, upstream=replay))
    aborted = [r for r in run.results if r.aborted]
    assert aborted, "the workload must contain aborts"
    assert all(r.error is None for r in run.results)
    sums = _log_sums(stack, {r.rid for r in run.results}, len(run.results))
    for team in TOKENS:
        assert sums[team] == run.expected(team), team
    by_rid = {e["request_id"]: e for e in stack.log_entries()}
    for r in aborted:
        assert by_rid[r.rid]["total_tokens"] is None
