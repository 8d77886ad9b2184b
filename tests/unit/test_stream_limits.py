"""Per-stream work and memory are bounded: one ext_proc message costs a
bounded amount of decoding and parsing, a whole SSE event and an NDJSON line are capped, line
assembly is linear, and the bytes held by all streams of a worker have a ceiling. Every reply is
still a plain CONTINUE sent at once; what was given up is counted."""

from __future__ import annotations

import gzip
import time

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.apis.base import ApiParser, Limits
from extproc.core.config import parse
from extproc.core.observation import Observation
from extproc.server.processor import Processor
from extproc.server.replies import CONTINUE_RESPONSE_BODY
from tests.unit.test_processor import Recorder, body, headers, req_headers, run

SSE = {":status": "200", "content-type": "text/event-stream"}
USAGE_EVENT = (
    b'data: {"id":"c","model":"gpt-4o-mini-2024-07-18","choices":[],'
    b'"usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}}\n\n'
)


def stream_msgs(chunks: list[bytes], encoding: str = "", ctype: str = "text/event-stream") -> list[pb.ProcessingRequest]:
    hdrs = {":status": "200", "content-type": ctype, **({"content-encoding": encoding} if encoding else {})}
    return (
        [req_headers(), body("request_body", b'{"model":"gpt-4o-mini","stream":true}', end=True), headers("response_headers", **hdrs)]
        + [body("response_body", c) for c in chunks]
        + [body("response_body", b"", end=True)]
    )


def test_gzip_sse_of_tiny_lines_costs_one_bounded_message():
    """14 such responses cost 59 innocent calls their tokens: 64 KiB of gzip expanded to tens of
    MB of `data: x` lines, all parsed inside one message (seconds of event loop). Now the message
    is refused after at most maxDecodedBytesPerMessage/maxLinesPerMessage, counted."""
    bomb = gzip.compress(b"data: x\n\n" * 3_000_000, compresslevel=9)  # 27 MB of tiny lines
    rec = Recorder()
    p = Processor(parse({}), [rec])
    msgs = stream_msgs([bomb[i : i + 16384] for i in range(0, len(bomb), 16384)], "gzip")
    t0 = time.thread_time()  # CPU time: what the messages cost, not the waits for a CPU of a loaded machine
    replies = run(p, msgs)
    cpu = time.thread_time() - t0
    assert cpu < 1.0, f"{cpu:.2f} s of CPU"
    body_replies = replies[3:]
    assert len(body_replies) == len(range(0, len(bomb), 16384)) + 1  # one reply per message
    assert all(r.HasField("response_body") and not r.response_body.response.HasField("body_mutation") for r in body_replies)
    assert all(r.SerializeToString() == CONTINUE_RESPONSE_BODY for r in body_replies[:-1])  # nothing to report until the end
    assert rec.calls[0].obs.parse_error_reason == "message_budget"
    assert p.counters.abandoned == {"message_budget": 1} and p.counters.held == 0 and p.counters.internal_errors == 0


def test_identity_sse_message_with_too_many_lines_is_refused_before_parsing():
    rec = Recorder()
    p = Processor(parse({"limits": {"maxLinesPerMessage": 1000}}), [rec])
    run(p, stream_msgs([b"data: {}\n\n" * 600, USAGE_EVENT]))  # 1,200 lines in one message
    assert rec.calls[0].obs.parse_error_reason == "message_budget"
    assert rec.calls[0].obs.usage.total_tokens is None  # given up: nothing after is parsed


def test_normal_streams_are_within_the_budgets():
    rec = Recorder()
    p = Processor(parse({}), [rec])
    events = b"".join(b'data: {"choices":[{"delta":{"content":"hello there"}}]}\n\n' for _ in range(2000)) + USAGE_EVENT
    payload = gzip.compress(events)
    run(p, stream_msgs([payload[i : i + 4096] for i in range(0, len(payload), 4096)], "gzip"))
    run(p, stream_msgs([events]))
    assert [c.obs.usage.total_tokens for c in rec.calls] == [33, 33]
    assert p.counters.abandoned == {} and p.counters.held == 0


def test_whole_sse_event_of_many_short_data_lines_is_capped():
    """maxEventBytes capped one line only: 150 MB of short `data:` lines in one event grew a
    worker to 2.4 GB. The event is dropped past the cap (held bytes stay under it), the stream
    goes on (the usage event after it is read)."""
    rec = Recorder()
    p = Processor(parse({"limits": {"maxEventBytes": 1 << 16}}), [rec])
    stream = p.open_stream()
    for m in stream_msgs([])[:3]:
        stream.handle(m)
    peak = 0
    for _ in range(200):
        stream.handle(body("response_body", b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n" * 100))  # 3.7 KB per message
        peak = max(peak, p.counters.held)
    stream.handle(body("response_body", b"\n" + USAGE_EVENT, end=True))
    p.close_stream(stream)
    assert peak <= 1 << 16
    assert rec.calls[0].obs.usage.total_tokens == 33
    assert rec.calls[0].obs.parse_error_reason == "sse_line_too_long" and p.counters.held == 0


def test_ndjson_line_assembly_is_linear_and_capped():
    """The pending NDJSON line's length was recomputed on every chunk: 40 KB written one byte at
    a time cost 37 s of CPU."""
    line = b'{"model":"llama3","done":true,"prompt_eval_count":5,"eval_count":7,"pad":"' + b"x" * 40_000 + b'"}\n'
    parser = ApiParser(Observation())
    parser.start_response(200, "application/x-ndjson")
    t0 = time.thread_time()  # CPU time, as above
    for i in range(len(line)):
        parser.feed_response(line[i : i + 1], False)
    cpu = time.thread_time() - t0
    assert cpu < 1.0, f"{cpu:.2f} s of CPU for {len(line)} one-byte chunks"
    assert parser.held_bytes() == 0

    capped = ApiParser(Observation(), limits=Limits(max_event_bytes=1024))
    capped.start_response(200, "application/x-ndjson")
    for _ in range(100):
        capped.feed_response(b"y" * 100, False)
        assert capped.held_bytes() <= 1024
    capped.feed_response(b'rest\n{"a":1}\n', True)
    assert capped.obs.parse_error_reason == "ndjson_line_too_long" and capped.obs.parse_errors == 1


def test_bytes_held_by_all_streams_of_a_worker_are_capped():
    rec = Recorder()
    p = Processor(parse({"limits": {"maxHeldBytes": 1 << 20}}), [rec])
    json_resp = {":status": "200", "content-type": "application/json"}
    streams = []
    for _ in range(3):  # three non-streamed bodies of 600 KB each, none finished yet
        s = p.open_stream()
        s.handle(req_headers())
        s.handle(headers("response_headers", **json_resp))
        s.handle(body("response_body", b'{"pad":"' + b"x" * 600_000))
        streams.append(s)
        assert p.counters.held <= 1 << 20
    assert p.counters.abandoned == {"worker_held_bytes": 2}  # the second and third would have gone over
    for s in streams:
        s.handle(body("response_body", b'"}', end=True))
        p.close_stream(s)
    assert p.counters.held == 0
    assert [c.obs.parse_error_reason for c in rec.calls] == [None, "worker_held_bytes", "worker_held_bytes"]


def test_memory_held_by_ended_streams_is_returned():
    """Memory held by ended streams was not returned under grpclib: 16 streams of 4 MiB bodies
    left ~+75 MiB RSS after they ended, round after round (glibc keeps freed heap). The worker's
    trimmer gives it back."""
    import json
    import subprocess
    import sys

    from tests.support.harness import REPO

    out = subprocess.run(
        [sys.executable, "-m", "tests.support.held_memory"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert rss["held"] == 0
    assert max(rss["after"]) - rss["before"] < 25, rss


def test_the_memory_trimmer_sleeps_until_a_stream_held_something_large(monkeypatch):
    """The trimmer is woken by nothing while streams stay small (an idle worker used to wake every
    second for it: a wake-up is ~100-150 us of CPU on a small VM); once a stream held 1 MiB it
    looks every interval until those buffers are freed, trims once, and sleeps again."""
    import asyncio

    from extproc.server import memory

    trims = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: trims.append(1))
    rec = Recorder()
    p = Processor(parse({"listen": "127.0.0.1:1", "limits": {"maxHeldBytes": 8 << 20}}), [rec])
    counters = p.counters
    checks = []

    def due() -> bool:
        checks.append(counters.held)
        return counters.trim_due()

    async def main() -> None:
        trimmer = asyncio.create_task(memory.trim_loop(due, counters.trim_wanted, 0.01))
        run(p, stream_msgs([USAGE_EVENT]))  # a small stream
        await asyncio.sleep(0.1)
        assert checks == [] and trims == []  # ten intervals, not one wake-up
        s = p.open_stream()
        s.handle(req_headers())
        s.handle(headers("response_headers", **{":status": "200", "content-type": "application/json"}))
        s.handle(body("response_body", b'{"pad":"' + b"x" * (1 << 20)))  # held until its end
        await asyncio.sleep(0.05)
        assert checks and trims == []  # looking, but the buffer is still held
        s.handle(body("response_body", b'"}', end=True))
        p.close_stream(s)
        await asyncio.sleep(0.05)
        assert trims == [1]
        looked = len(checks)
        await asyncio.sleep(0.1)
        assert len(checks) == looked and trims == [1]  # asleep again
        trimmer.cancel()

    asyncio.run(main())
