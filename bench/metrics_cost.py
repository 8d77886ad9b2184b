"""Cost of MetricsObserver.on_call_end per call, in-process registry vs multiprocess (mmap) mode.

    python bench/metrics_cost.py            # both modes
    python bench/metrics_cost.py --mode single|multi
    python bench/metrics_cost.py --otlp     # Prometheus and OTLP both on (one measurement per call)

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


def measure(n: int, otlp: bool = False) -> float:
    from google.protobuf import struct_pb2
    from prometheus_client import CollectorRegistry

    from extproc.core.call import OK, Call
    from extproc.core.config import parse
    from extproc.telemetry.metrics import MetricsObserver

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from extproc.telemetry import prometheus_store

        prometheus_store.install()  # as the Prometheus endpoint does before the workers fork

    stats = parse(
        {
            "stats": {
                "customLabels": [{"name": "team", "metadataKey": "principal:team"}, {"name": "user_id", "metadataKey": "principal:sub"}],
                "otlp": {"enabled": otlp, "exportIntervalMs": 3_600_000},
            }
        }
    ).stats
    observers: list = []
    if otlp:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        from extproc.telemetry.otlp_metrics import OtlpMetrics

        # No export during the run (hour-long interval): what is measured is recording.
        observers.append(OtlpMetrics(stats, ConsoleMetricExporter(out=open(os.devnull, "w"))))
    observer = MetricsObserver(stats, CollectorRegistry(), observers[0].measurer if otlp else None)
    observers.insert(0, observer)

    def on_call_end(call: Call) -> None:
        for o in observers:
            o.on_call_end(call)

    calls = []
    for i in range(50):
        s = struct_pb2.Struct()
        s.update({"principal": {"sub": f"user{i}", "team": f"team{i % 5}"}})
        c = Call(
            provider="openai",
            api="openai.chat",
            status=200,
            outcome=OK,
            forwarded={"envoy.filters.http.jwt_authn": s},
            start=0.0,
            first_chunk=0.4,
            end=2.5,
        )
        o = c.obs
        o.operation, o.request_model, o.response_model, o.streaming = "chat", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", True
        u = o.usage
        u.input_tokens, u.output_tokens, u.total_tokens, u.cached_input_tokens, u.reasoning_tokens = 120, 300, 420, 64, 0
        calls.append(c)
    for c in calls:
        on_call_end(c)  # warm: children created
    it = iter(calls * (n // len(calls) + 1))
    t = timeit.timeit(lambda: on_call_end(next(it)), number=n)
    assert all(o.failures == 0 for o in observers)
    for o in observers[1:]:
        o.shutdown()
    return t / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("single", "multi", "both"), default="both")
    ap.add_argument("-n", type=int, default=50_000)
    ap.add_argument("--otlp", action="store_true", help="OTLP metrics on too: both observers, per call")
    args = ap.parse_args()
    what = "Prometheus + OTLP observers" if args.otlp else "on_call_end"
    if args.mode == "single":
        print(f"single-process registry: {measure(args.n, args.otlp):.1f} us per {what}")
    elif args.mode == "multi":
        assert os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        print(f"multiprocess (mmap) mode: {measure(args.n, args.otlp):.1f} us per {what}")
    else:
        extra = ["--otlp"] if args.otlp else []
        subprocess.run([sys.executable, __file__, "--mode", "single", "-n", str(args.n), *extra], check=True)
        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
            subprocess.run([sys.executable, __file__, "--mode", "multi", "-n", str(args.n), *extra], check=True, env=env)


if __name__ == "__main__":
    main()
