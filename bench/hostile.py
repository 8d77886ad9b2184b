"""`python -m bench.hostile`: normal traffic next to hostile upstreams and clients.

Through the real topology (Envoy + the sidecar with 2 workers, 127.0.0.1 only) for --duration
seconds (default 60):

- normal: --concurrency clients (default 32) alternating an OpenAI streaming chat (usage 11/22/33)
  and a non-streamed one (9/36/45);
- hostile upstream responses, through Envoy: a gzip-compressed SSE stream of 3 million tiny
  ``data:`` lines (84 KB on the wire, 27 MB decoded), one SSE event made of 8 MB of short data
  lines, an NDJSON line written a byte at a time;
- hostile clients: through Envoy, 2 MB request bodies and streams abandoned mid-response;
  directly on the sidecar's gRPC port, undecodable messages, 8 MB messages and 300 idle streams.

Checks, printed and in the exit code (1 if any fails): every normal call's access-log line has
its known usage, the token counters equal the same sums (hostile responses carry no usage), zero
Envoy ext_proc message timeouts, worker RSS under --max-rss-mib (150). Also prints /metrics size.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procstat import process_rss, tree  # noqa: E402
from tests.support.harness import Stack, scrape, total  # noqa: E402

MODEL = "gpt-4o-mini"
STREAM_USAGE = (11, 22, 33)
JSON_USAGE = (9, 36, 45)


# ---- the upstream (its own process: `python -m bench.hostile --upstream PORT`) ----------------
def _sse_normal() -> list[bytes]:
    out = []
    for word in ("Hello", " there", "!"):
        chunk = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
        }
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    p, c, t = STREAM_USAGE
    out.append(
        b"data: "
        + orjson.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": MODEL,
                "choices": [],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t},
            }
        )
        + b"\n\n"
    )
    out.append(b"data: [DONE]\n\n")
    return out


def _json_normal() -> bytes:
    p, c, t = JSON_USAGE
    return orjson.dumps(
        {
            "id": "c2",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t},
        }
    )


GZIP_TINY = gzip.compress(b"data: x\n\n" * 3_000_000, compresslevel=9)
MANY_DATA_LINE = b"data: " + b"x" * 58 + b"\n"
MANY_DATA_LINES = (8 << 20) // len(MANY_DATA_LINE)


async def _answer(kind: str, w: asyncio.StreamWriter) -> None:
    def head(status: int, ctype: str, extra: str = "") -> None:
        w.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\n{extra}transfer-encoding: chunked\r\n\r\n".encode())

    def chunk(data: bytes) -> None:
        w.write(b"%x\r\n%s\r\n" % (len(data), data))

    if kind == "stream":
        head(200, "text/event-stream")
        for event in _sse_normal():
            chunk(event)
            await w.drain()
    elif kind == "json":
        head(200, "application/json")
        chunk(_json_normal())
    elif kind == "gzip-tiny":
        head(200, "text/event-stream", "content-encoding: gzip\r\n")
        for i in range(0, len(GZIP_TINY), 16384):
            chunk(GZIP_TINY[i : i + 16384])
            await w.drain()
    elif kind == "many-data":
        head(200, "text/event-stream")
        block = MANY_DATA_LINE * 1024
        for _ in range(MANY_DATA_LINES // 1024):
            chunk(block)
            await w.drain()
        chunk(b"\n")
    elif kind == "ndjson-drip":
        head(200, "application/x-ndjson")
        for b in b'{"pad":"' + b"y" * 4000 + b'"}\n':
            chunk(bytes([b]))
            await w.drain()
    else:  # big request bodies and anything else: an error without usage
        head(400, "application/json")
        chunk(b'{"error":{"type":"invalid_request_error"}}')
    w.write(b"0\r\n\r\n")
    await w.drain()


async def _connection(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:] if line)
            }
            if "chunked" in headers.get("transfer-encoding", "").lower():  # Envoy may re-frame a body it buffered
                while True:
                    size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                    await r.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                await r.readexactly(int(headers.get("content-length", "0")))
            await _answer(headers.get("x-kind", ""), w)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        w.close()


async def _upstream(port: int) -> None:
    server = await asyncio.start_server(_connection, "127.0.0.1", port, limit=1 << 20)
    async with server:
        await server.serve_forever()


# ---- the drivers ---------------------------------------------------------------------------
@dataclass
class Tally:
    normal: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # rid -> expected usage
    normal_errors: int = 0
    normal_error_kinds: dict[str, int] = field(default_factory=dict)
    hostile: dict[str, int] = field(default_factory=dict)


async def _normal(url: str, deadline: float, concurrency: int, tally: Tally) -> None:
    import httpx

    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    sbody = orjson.dumps(
        {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "hi"}]}
    )
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker(n: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                streaming = (i + n) % 2 == 0
                rid = f"normal-{uuid.uuid4()}"
                try:
                    r = await client.post(
                        url + "/v1/chat/completions",
                        content=sbody if streaming else body,
                        headers={"x-kind": "stream" if streaming else "json", "x-request-id": rid, "content-type": "application/json"},
                    )
                    ok = r.status_code == 200 and (b"[DONE]" in r.content if streaming else b'"usage"' in r.content)
                    why = f"status {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                if ok:
                    tally.normal[rid] = STREAM_USAGE if streaming else JSON_USAGE
                else:
                    tally.normal_errors += 1
                    tally.normal_error_kinds[why] = tally.normal_error_kinds.get(why, 0) + 1

        await asyncio.gather(*(worker(n) for n in range(concurrency)))


async def _hostile_http(url: str, deadline: float, tally: Tally) -> None:
    import httpx

    kinds = ["gzip-tiny", "many-data", "ndjson-drip", "big-request", "abort"]
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                kind = kinds[i % len(kinds)]
                i += 1
                try:
                    if kind == "big-request":
                        await client.post(
                            url + "/v1/chat/completions", content=b'{"model":"' + b"m" * (2 << 20) + b'"}', headers={"x-kind": kind}
                        )
                    elif kind == "abort":
                        async with client.stream(
                            "POST", url + "/v1/chat/completions", content=b'{"model":"m","stream":true}', headers={"x-kind": "many-data"}
                        ) as r:
                            async for _ in r.aiter_raw():
                                break  # hang up after the first bytes
                    else:
                        r = await client.post(
                            url + "/v1/chat/completions", content=b'{"model":"m","stream":true}', headers={"x-kind": kind}
                        )
                        await r.aread()
                    tally.hostile[kind] = tally.hostile.get(kind, 0) + 1
                except httpx.HTTPError:
                    tally.hostile[kind + " (client error)"] = tally.hostile.get(kind + " (client error)", 0) + 1

        await asyncio.gather(*(worker(n) for n in range(3)))


async def _hostile_grpc(address: str, deadline: float, tally: Tally) -> None:
    import grpc

    method = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as ch:

        def raw():
            return ch.stream_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)()

        idle = []
        for _ in range(300):  # streams that open and then say nothing
            call = raw()
            idle.append(call)
        while time.monotonic() < deadline:
            for kind, payload in (("grpc-undecodable", b"\xff\xff\xff\xff"), ("grpc-8MB", b"\x0a" + b"\xff" * (8 << 20))):
                call = raw()
                try:
                    await call.write(payload)
                    await call.read()
                except grpc.aio.AioRpcError:
                    pass
                except grpc.aio.UsageError:
                    pass
                call.cancel()
                tally.hostile[kind] = tally.hostile.get(kind, 0) + 1
            await asyncio.sleep(0.2)
        for call in idle:
            call.cancel()


async def _drive(stack: Stack, duration: float, concurrency: int, tally: Tally) -> None:
    deadline = time.monotonic() + duration
    url = stack.url("")
    await asyncio.gather(
        _normal(url, deadline, concurrency, tally),
        _hostile_http(url, deadline, tally),
        _hostile_grpc(f"127.0.0.1:{stack.sidecar_port}", deadline, tally),
    )


def run(duration: float, concurrency: int, max_rss_mib: float, workdir: Path, message_timeout_ms: int = 500) -> dict:
    from extproc.devtools.dev import free_port, wait_port

    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "bench.hostile", "--upstream", str(port)], cwd=REPO)
    try:
        wait_port(port, proc=up)
        tally = Tally()
        with Stack(workdir, f"http://127.0.0.1:{port}", workers=2, message_timeout_ms=message_timeout_ms) as s:
            assert s.sidecar is not None
            workers = [p for p in tree(s.sidecar.pid) if p != s.sidecar.pid]
            peak: dict[int, int] = {p: process_rss(p) for p in workers}
            done = False

            def sample() -> None:
                while not done:
                    for p in workers:
                        peak[p] = max(peak.get(p, 0), process_rss(p))
                    time.sleep(0.5)

            import threading

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.monotonic()
            asyncio.run(_drive(s, duration, concurrency, tally))
            elapsed = time.monotonic() - t0
            time.sleep(2)
            done = True
            sampler.join()
            stats = {k: s.envoy_stat(f"http.llm.ext_proc.{k}") for k in ("streams_started", "message_timeouts", "failure_mode_allowed")}
            samples = scrape(s.metrics_port)
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10) as r:
                metrics_bytes = len(r.read())
            logged = {e["request_id"]: e for e in s.log_entries() if str(e.get("request_id", "")).startswith("normal-")}
            end_rss = {p: process_rss(p) for p in workers}
            wrong = 0
            sums = [0, 0, 0]
            for rid, usage in tally.normal.items():
                e = logged.get(rid)
                got = (e["prompt_tokens"], e["completion_tokens"], e["total_tokens"]) if e else None
                wrong += got != usage
                sums = [a + b for a, b in zip(sums, usage, strict=True)]
            counters = (total(samples, "ai_prompt_tokens_total"), total(samples, "ai_completion_tokens_total"))
            stderr = s.sidecar_stderr()
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(10)
    result = {
        "duration_s": round(elapsed, 1),
        "normal_calls": len(tally.normal),
        "normal_client_errors": tally.normal_errors,
        "normal_client_error_kinds": tally.normal_error_kinds,
        "normal_rps": round(len(tally.normal) / elapsed, 1),
        "normal_wrong_or_missing_in_access_log": wrong,
        "expected_prompt_completion": sums[:2],
        "counters_prompt_completion": [int(c) for c in counters],
        "envoy": stats,
        "hostile": tally.hostile,
        "worker_rss_peak_mib": {str(p): round(v / 2**20, 1) for p, v in peak.items()},
        "worker_rss_end_mib": {str(p): round(v / 2**20, 1) for p, v in end_rss.items()},
        "metrics_bytes": metrics_bytes,
        "abandoned_log_lines": stderr.count("stream parsing abandoned"),
        "malformed_log_lines": stderr.count("malformed ext_proc stream"),
        "tracebacks": stderr.count("Traceback"),
    }
    result["ok"] = (
        wrong == 0
        and tally.normal_errors == 0
        and len(tally.normal) > 0
        and [int(c) for c in counters] == sums[:2]
        and stats["message_timeouts"] == 0
        and max(peak.values()) < max_rss_mib * 2**20
        and result["tracebacks"] == 0
    )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-rss-mib", type=float, default=150)
    ap.add_argument("--message-timeout-ms", type=int, default=500, help="Envoy ext_proc message_timeout (reference: 500)")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # internal: run the upstream on this port
    args = ap.parse_args(argv)
    if args.upstream:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        asyncio.run(_upstream(args.upstream))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.duration, args.concurrency, args.max_rss_mib, Path(tmp), args.message_timeout_ms)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
