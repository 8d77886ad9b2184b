"""Cost of MetricsObserver.on_call_end per call, in-process registry vs multiprocess (mmap) mode.

    python -m bench.metrics_cost            # both modes
    python -m bench.metrics_cost --mode single|multi
    python -m bench.metrics_cost --otlp     # Prometheus and OTLP both on (one measurement per call)
    python -m bench.metrics_cost --checkout BASE --checkout . --reps 3   # an A/B, alternated

A call is a streamed chat completion with usage (input, output, cached, reasoning) and two custom
labels from jwt_authn claims; users rotate over 50 values, so label lookups hit a warm cache as in
production.

Each mode is measured in a process of its own (multiprocess mode is chosen by
``PROMETHEUS_MULTIPROC_DIR`` when prometheus-client is imported) importing ``extproc`` from a
checkout: each ``--checkout``, or without one the checkout this process imports (the installed one,
or ``PYTHONPATH``'s). The process reports where its ``extproc`` came from, and a measurement of any
other code is an error, so an A/B never measures the same code twice unnoticed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path


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


MODES = {"single": "single-process registry", "multi": "multiprocess (mmap) mode"}


def measured(checkout: str, mode: str, n: int, otlp: bool = False) -> float:
    """Microseconds per call in ``mode``, measured in a child process that imports ``extproc``
    from ``checkout``; raises if the child's ``extproc`` came from anywhere else."""
    here = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as d:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        if mode == "multi":
            env["PROMETHEUS_MULTIPROC_DIR"] = d
        argv = [sys.executable, "-m", "bench.metrics_cost", "--child", checkout, "--mode", mode, "-n", str(n)]
        out = subprocess.run([*argv, *(["--otlp"] if otlp else [])], cwd=here, env=env, capture_output=True, text=True, check=True)
    value, imported = out.stdout.splitlines()[-1].split("\t")
    if Path(imported).parent != Path(checkout) / "extproc":
        raise RuntimeError(f"measured the extproc of {imported}, not of the checkout {checkout}")
    return float(value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.metrics_cost")
    ap.add_argument("--mode", choices=(*MODES, "both"), default="both")
    ap.add_argument("-n", type=int, default=50_000)
    ap.add_argument("--otlp", action="store_true", help="OTLP metrics on too: both observers, per call")
    ap.add_argument("--checkout", action="append", metavar="DIR", help="import extproc from this checkout (repeat for an A/B)")
    ap.add_argument("--reps", type=int, default=3, help="with --checkout: rounds, each measuring every checkout in turn")
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        sys.path.insert(0, a.child)
        import extproc

        print(f"{measure(a.n, a.otlp):.2f}\t{extproc.__file__}")
        return
    modes = list(MODES) if a.mode == "both" else [a.mode]
    what = "Prometheus + OTLP observers" if a.otlp else "on_call_end"
    if not a.checkout:
        import extproc  # the package alone: where this process finds it (installed, or PYTHONPATH's)

        here = str(Path(extproc.__file__).parent.parent)
        for mode in modes:
            print(f"{MODES[mode]}: {measured(here, mode, a.n, a.otlp):.1f} us per {what}")
        return
    checkouts = [str(Path(c).resolve()) for c in a.checkout]
    results: dict[tuple[str, str], list[float]] = {(c, m): [] for c in checkouts for m in modes}
    for _ in range(a.reps):
        for c in checkouts:
            for m in modes:
                results[(c, m)].append(measured(c, m, a.n, a.otlp))
    for m in modes:
        print(f"{MODES[m]}, us per {what}")
        for c in checkouts:
            values = results[(c, m)]
            print(f"  {c}: median {statistics.median(values):.1f} (" + ", ".join(f"{v:.1f}" for v in values) + ")")


if __name__ == "__main__":
    main()
