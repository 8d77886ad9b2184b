"""limits.maxStreams end to end: a real Envoy, the sidecar with one worker and room for one stream.

While a slow streamed call holds that one ext_proc stream, the worker refuses the next call's
stream as it opens (HTTP/2 REFUSED_STREAM). Envoy (``failure_mode_allow``) lets that call through
unobserved: the client gets exactly the upstream's bytes, the sidecar counts the refusal in
``ai_streams_refused_total``, and Envoy counts a failed ext_proc stream. Once the slot is free
again, calls are observed as usual. In each mode: headers messages, fewer messages, and
observability mode (where Envoy never waits for the sidecar, so shedding matters most).
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.support.harness import Stack, scrape, total
from tests.support.recordings import load

pytestmark = pytest.mark.integration

MODES = {
    "default": {},
    "fewer": {"fewer_messages": True},
    "observability": {"observability_mode": True},
    "observability-fewer": {"observability_mode": True, "fewer_messages": True},
}
HELD = "aigw__chat-streaming-detailed-usage.yaml"  # 12 prompt + 100 completion tokens
OTHER = "aigw__chat-basic.yaml"  # 8 prompt + 377 completion tokens
EXT_PROC = "http.llm.ext_proc."
ENVOY_COUNTERS = ("streams_started", "streams_failed", "failure_mode_allowed", "message_timeouts")
# The ext_proc cluster's view of the refused stream: reset by the peer, a 503 to the gRPC client.
CLUSTER_COUNTERS = ("cluster.ext_proc.http2.rx_reset", "cluster.ext_proc.upstream_rq_503")


def _sidecar(stack: Stack, name: str, **labels: str) -> float:
    return total(scrape(stack.metrics_port), name, **labels)


def _wait_sidecar(stack: Stack, name: str, value: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (got := _sidecar(stack, name)) != value:
        assert time.monotonic() < deadline, f"{name} is {got}, expected {value}"
        time.sleep(0.05)


def _envoy(stack: Stack) -> dict[str, int]:
    return {k: stack.envoy_stat(EXT_PROC + k) for k in ENVOY_COUNTERS} | {k: stack.envoy_stat(k) for k in CLUSTER_COUNTERS}


def _envoy_after_failure(stack: Stack, before: dict[str, int], timeout: float = 10) -> dict[str, int]:
    """Envoy's counters once it has seen the stream fail (in observability mode the call may be
    over before the refusal reaches Envoy), as increases since ``before``."""
    deadline = time.monotonic() + timeout
    while (now := _envoy(stack))["streams_failed"] == before["streams_failed"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return {k: now[k] - before[k] for k in now}


def _post(stack: Stack, fixture: str, **extra: str) -> tuple[httpx.Response, str]:
    rec = load(fixture)
    rid = str(uuid.uuid4())
    headers = {"content-type": "application/json", "x-fixture": fixture, "x-request-id": rid, **extra}
    return httpx.post(stack.url(rec.path), content=rec.request_body, headers=headers, timeout=20), rid


@pytest.mark.parametrize("mode", MODES)
def test_refused_stream_is_let_through_unobserved(tmp_path, replay, mode):
    observability = mode.startswith("observability")
    # renderIntervalSeconds 0: every scrape sees the counters as they are now.
    cfg = {"limits": {"maxStreams": 1}, "stats": {"renderIntervalSeconds": 0}}
    with Stack(tmp_path, replay.url, sidecar_config=cfg, workers=1, **MODES[mode]) as s:
        held, other = load(HELD), load(OTHER)
        gate, held_rid = str(uuid.uuid4()), str(uuid.uuid4())
        headers = {"content-type": "application/json", "x-fixture": HELD, "x-gate": gate, "x-request-id": held_rid}
        with httpx.stream("POST", s.url(held.path), content=held.request_body, headers=headers, timeout=20) as r1:
            chunks = r1.iter_raw()
            first = next(chunks)  # the upstream holds the rest: the call's ext_proc stream stays open
            _wait_sidecar(s, "ai_active_streams", 1)
            before = _envoy(s)

            # The body comes 300 ms after the headers, so the refusal reaches Envoy while the call
            # is in flight. (In observability mode a refusal arriving after the call ended shows
            # only in the ext_proc cluster's counters: the filter is gone and counts nothing.)
            r2, rid2 = _post(s, OTHER, **{"x-body-delay-ms": "300"})
            assert r2.status_code == other.status and r2.content == other.body  # exactly the upstream's bytes
            assert r2.headers["content-type"] == other.content_type
            entry2 = s.log_entry(rid2)
            assert entry2["response_code"] == other.status
            assert entry2["model"] is None and entry2["total_tokens"] is None and entry2["cost_usd"] is None  # unobserved

            # Envoy does not wait for a stream's first reply in observability mode: the call can
            # be over before the worker has even read the stream's opening.
            _wait_sidecar(s, "ai_streams_refused_total", 1)
            samples = scrape(s.metrics_port)
            assert total(samples, "ai_streams_refused_total", reason="max_streams") == 1
            assert total(samples, "ai_streams_refused_total") == 1  # no other reason
            assert total(samples, "ai_active_streams") == 1 and total(samples, "ai_requests_total") == 0
            # Envoy 1.40 opened the stream, saw it fail (reset by the sidecar, not a timeout) and
            # let the call through.
            assert _envoy_after_failure(s, before) == {
                "streams_started": 1,
                "streams_failed": 1,
                "failure_mode_allowed": 1,
                "message_timeouts": 0,
                "cluster.ext_proc.http2.rx_reset": 1,
                "cluster.ext_proc.upstream_rq_503": 1,
            }

            replay.open_gate(gate)
            rest = b"".join(chunks)
        assert r1.status_code == held.status and first + rest == held.body
        _wait_sidecar(s, "ai_active_streams", 0)  # the slot is free again

        r3, rid3 = _post(s, OTHER)
        assert r3.status_code == other.status and r3.content == other.body
        _wait_sidecar(s, "ai_requests_total", 2)  # the held call and the third; not the refused one
        samples = scrape(s.metrics_port)
        assert total(samples, "ai_prompt_tokens_total") == 12 + 8
        assert total(samples, "ai_completion_tokens_total") == 100 + 377
        assert total(samples, "ai_streams_refused_total") == 1
        end = _envoy(s)  # the refused stream stays the only failure
        assert (end["streams_failed"], end["failure_mode_allowed"], end["cluster.ext_proc.upstream_rq_503"]) == (1, 1, 1)
        if not observability:  # observability mode: Envoy ignores the metadata the sidecar returns
            assert s.log_entry(held_rid)["total_tokens"] == 112
            entry3 = s.log_entry(rid3)
            assert (entry3["model"], entry3["prompt_tokens"], entry3["completion_tokens"], entry3["total_tokens"]) == (
                "gpt-5-nano",
                8,
                377,
                385,
            )
