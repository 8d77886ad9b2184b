"""What tracing costs per call, without gRPC, HTTP/2 or Envoy: process CPU per non-streamed call
driven through the Processor (as ``bench.handler_cost`` drives it), tracing off and tracing to a
live OTLP/gRPC collector (``bench.otlp_sink`` in its own process), the export thread included.
Best of 5 rounds of 20,000 calls, each measurement in its own process; process CPU time, so a busy
machine's preemption barely moves it (a quieter A/B than ``bench.ab`` for tracing changes).

    python -m bench.tracing_cost                                       # this checkout
    python -m bench.tracing_cost --checkout BASE --checkout . --reps 4   # an A/B, alternated
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CALLS = 20000
CHAT = (
    b'{"id":"c1","model":"gpt-4o-2024","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'
)


def measure(tracing: str, port: int) -> float:
    """Microseconds of process CPU per call, best of 5 rounds."""
    from extproc._pb.envoy_api import external_processor_pb2 as pb
    from extproc.core.config import parse
    from extproc.server.processor import Processor
    from extproc.telemetry import observers as app

    cfg = parse({"tracing": {"otlpEndpoint": f"127.0.0.1:{port}"}} if tracing == "live" else {})

    def headers(kind: str, **h: str) -> pb.ProcessingRequest:
        hm = pb.HttpHeaders()
        for k, v in h.items():
            hm.headers.headers.add(key=k, raw_value=v.encode())
        return pb.ProcessingRequest(**{kind: hm})

    def body(kind: str, data: bytes) -> pb.ProcessingRequest:
        return pb.ProcessingRequest(**{kind: pb.HttpBody(body=data, end_of_stream=True)})

    messages = [
        headers("request_headers", **{":path": "/v1/chat/completions", ":method": "POST", ":authority": "api.openai.com"}),
        body("request_body", b'{"model":"gpt-4o","stream":false,"messages":[]}'),
        headers("response_headers", **{":status": "200", "content-type": "application/json"}),
        body("response_body", CHAT),
    ]
    p = Processor(cfg, app.observers(cfg))

    def drive() -> None:
        s = p.open_stream({})
        for m in messages:
            s.handle(m)
        p.close_stream(s)

    for _ in range(3000):  # warm: caches, the export thread's first batches
        drive()
    best = float("inf")
    for _ in range(5):
        cpu = time.process_time()
        for _ in range(CALLS):
            drive()
        best = min(best, time.process_time() - cpu)
    return 1e6 * best / CALLS


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.tracing_cost")
    ap.add_argument("--checkout", action="append", metavar="DIR", help="import extproc from this checkout (repeat for an A/B)")
    ap.add_argument("--reps", type=int, default=3, help="rounds, each measuring every checkout, tracing off and live, in turn")
    ap.add_argument("--child", nargs=2, metavar=("TRACING", "PORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(f"{measure(a.child[0], int(a.child[1])):.2f}")
        return
    from extproc.devtools.dev import free_port

    port = free_port()
    here = Path(__file__).resolve().parent.parent
    sink = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", str(port)], cwd=here)
    checkouts = [str(Path(c).resolve()) for c in a.checkout or ["."]]
    results: dict[tuple[str, str], list[float]] = {(c, t): [] for c in checkouts for t in ("off", "live")}
    try:
        time.sleep(1)
        for _ in range(a.reps):
            for c, t in results:
                # this file run in the checkout's directory, importing that checkout's extproc
                child = f"import runpy, sys; sys.argv = ['tracing_cost', '--child', {t!r}, '{port}']; runpy.run_path({__file__!r}, run_name='__main__')"
                out = subprocess.run(
                    [sys.executable, "-c", child],
                    cwd=c,
                    env={**os.environ, "PYTHONPATH": c},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[(c, t)].append(float(out.stdout.split()[-1]))
    finally:
        sink.kill()
    for c in checkouts:
        off, live = results[(c, "off")], results[(c, "live")]
        print(f"{c}: tracing off {statistics.median(off):.1f} us/call {off}, live {statistics.median(live):.1f} {live}")
        ratios = sorted(x / y for x, y in zip(live, off, strict=True))
        print(
            f"  tracing costs +{statistics.median(live) - statistics.median(off):.1f} us per call, live / off {statistics.median(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
