"""Cost of MetricsObserver.on_call_end per call, in-process registry vs multiprocess (mmap) mode.

    python bench/metrics_cost.py            # both modes
    python bench/metrics_cost.py --mode single|multi

A call is a streamed chat completion with usage (input, output, cached, reasoning) and two custom
labels from jwt_authn claims; users rotate over 50 values, so label lookups hit a warm cache as in
production.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import timeit


def measure(n: int) -> float:
    from google.protobuf import struct_pb2
    from prometheus_client import CollectorRegistry

    from extproc.core.call import OK, Call
    from extproc.core.config import parse
    from extproc.telemetry.metrics import MetricsObserver

    stats = parse({"stats": {"customLabels": [{"name": "team", "metadataKey": "principal:team"},
                                              {"name": "user_id", "metadataKey": "principal:sub"}]}}).stats
    observer = MetricsObserver(stats, CollectorRegistry())
    calls = []
    for i in range(50):
        s = struct_pb2.Struct()
        s.update({"principal": {"sub": f"user{i}", "team": f"team{i % 5}"}})
        c = Call(provider="openai", api="openai.chat", status=200, outcome=OK, forwarded={"envoy.filters.http.jwt_authn": s},
                 start=0.0, first_chunk=0.4, end=2.5)
        o = c.obs
        o.operation, o.request_model, o.response_model, o.streaming = "chat", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", True
        u = o.usage
        u.input_tokens, u.output_tokens, u.total_tokens, u.cached_input_tokens, u.reasoning_tokens = 120, 300, 420, 64, 0
        calls.append(c)
    for c in calls:
        observer.on_call_end(c)  # warm: children created
    it = iter(calls * (n // len(calls) + 1))
    t = timeit.timeit(lambda: observer.on_call_end(next(it)), number=n)
    assert observer.failures == 0
    return t / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("single", "multi", "both"), default="both")
    ap.add_argument("-n", type=int, default=50_000)
    args = ap.parse_args()
    if args.mode == "single":
        print(f"single-process registry: {measure(args.n):.1f} us per on_call_end")
    elif args.mode == "multi":
        assert os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        print(f"multiprocess (mmap) mode: {measure(args.n):.1f} us per on_call_end")
    else:
        subprocess.run([sys.executable, __file__, "--mode", "single", "-n", str(args.n)], check=True)
        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
            subprocess.run([sys.executable, __file__, "--mode", "multi", "-n", str(args.n)], check=True, env=env)


if __name__ == "__main__":
    main()
