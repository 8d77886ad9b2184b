"""Hostile traffic does not disturb normal traffic; a short version of `python -m bench.hostile` (which runs 60 s): normal
traffic at c=32 through Envoy next to hostile upstream responses (gzip-compressed tiny SSE
lines, an 8 MB SSE event, an NDJSON line dripped a byte at a time) and hostile clients
(2 MB request bodies, aborted streams; on the gRPC port undecodable and 8 MB messages, 300 idle
streams). The normal calls' accounting stays exact, Envoy never times out a message, workers stay
small, and no traceback is logged."""

from __future__ import annotations

import pytest

from bench.hostile import run

pytestmark = pytest.mark.integration


def test_normal_accounting_exact_next_to_hostile_traffic(tmp_path):
    r = run(duration=12, concurrency=32, max_rss_mib=150, workdir=tmp_path, message_timeout_ms=2000)
    assert r["normal_calls"] > 0 and r["normal_client_errors"] == 0, r
    assert r["normal_wrong_or_missing_in_access_log"] == 0, r
    assert r["counters_prompt_completion"] == r["expected_prompt_completion"], r
    assert r["envoy"]["message_timeouts"] == 0, r
    assert max(r["worker_rss_peak_mib"].values()) < 150, r
    assert r["tracebacks"] == 0 and r["malformed_log_lines"] >= 1, r
    assert all(r["hostile"].get(k) for k in ("gzip-tiny", "many-data", "ndjson-drip", "grpc-undecodable", "grpc-8MB")), r
