"""What an OTLP metrics export costs the worker recording calls: calls recorded per second, and
the longest a single call waited, with the export thread idle vs exporting every ``--interval-ms``.

    python -m bench.otlp_export_cost                       # 2,000 series, 100 ms and 1 s intervals
    python -m bench.otlp_export_cost --series 2000 --interval-ms 100 --seconds 5

The exporter encodes each export to OTLP protobuf exactly as the OTLP exporters do, then drops it
(no network: what is measured is the worker's side). ``--series`` distinct label sets (users,
a custom label) are recorded first; the timed loop then records calls over them, as a worker's
event loop does, while the SDK's reader thread collects and exports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


class EncodingExporter:
    """An OTLP metric exporter that encodes (the CPU an export costs) and discards."""

    def __new__(cls) -> Any:
        from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
        from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

        class _Exporter(MetricExporter):
            def __init__(self) -> None:
                super().__init__()
                self.exports = 0
                self.seconds: list[float] = []

            def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
                t = time.perf_counter()
                encode_metrics(metrics_data).SerializeToString()
                self.seconds.append(time.perf_counter() - t)
                self.exports += 1
                return MetricExportResult.SUCCESS

            def force_flush(self, timeout_millis: float = 10_000) -> bool:
                return True

            def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
                pass

        return _Exporter()


def run(series: int, interval_ms: int | None, seconds: float) -> dict[str, float]:
    from extproc.core.call import OK, Call
    from extproc.core.config import parse
    from extproc.telemetry.otlp_metrics import OtlpMetrics

    stats = parse(
        {
            "stats": {
                "maxLabelValues": series + 10,
                "maxSeries": 100 * series,
                "customLabels": [{"name": "user", "header": "x-user"}],
                "otlp": {"enabled": True, "endpoint": "127.0.0.1:1", "exportIntervalMs": interval_ms or 10**9},
            }
        }
    ).stats
    exporter = EncodingExporter()
    otlp = OtlpMetrics(stats, exporter)
    calls = []
    for i in range(series):
        c = Call(
            provider="openai",
            api="openai.chat",
            status=200,
            outcome=OK,
            headers={"x-user": f"user{i}"},
            start=0.0,
            first_chunk=0.4,
            end=2.5,
        )
        o = c.obs
        o.operation, o.request_model, o.response_model, o.streaming = "chat", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", True
        u = o.usage
        u.input_tokens, u.output_tokens, u.total_tokens, u.cached_input_tokens = 120, 300, 420, 64
        calls.append(c)
        otlp.on_call_end(c)
    if interval_ms:
        time.sleep(2 * interval_ms / 1000)  # the reader is in its rhythm
    waits: list[float] = []
    n = 0
    end = time.perf_counter() + seconds
    exports_before = exporter.exports
    while True:
        t = time.perf_counter()
        if t > end:
            break
        otlp.on_call_end(calls[n % series])
        waits.append(time.perf_counter() - t)
        n += 1
    exports = exporter.exports - exports_before
    export_ms = statistics.median(exporter.seconds) * 1000 if exporter.seconds else 0.0
    pacer = getattr(otlp, "pacer", None)
    export_cpu = pacer.last_cpu * 1000 if pacer is not None else 0.0
    otlp.shutdown()
    waits.sort()
    return {
        "calls_per_s": n / seconds,
        "p99_us": waits[int(len(waits) * 0.99)] * 1e6,
        "max_ms": waits[-1] * 1e3,
        "exports": exports,
        "encode_ms": export_ms,
        "export_cpu_ms": export_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=2000)
    ap.add_argument("--interval-ms", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    base = run(args.series, None, args.seconds)
    print(
        f"{args.series} label sets; export thread idle: {base['calls_per_s']:,.0f} calls/s, p99 {base['p99_us']:.0f} us, "
        f"max {base['max_ms']:.1f} ms"
    )
    for interval in args.interval_ms:
        r = run(args.series, interval, args.seconds)
        print(
            f"export every {interval} ms: {r['calls_per_s']:,.0f} calls/s ({(r['calls_per_s'] / base['calls_per_s'] - 1) * 100:+.0f}%), "
            f"p99 {r['p99_us']:.0f} us, max {r['max_ms']:.1f} ms; {r['exports']:.0f} exports, encode {r['encode_ms']:.0f} ms each"
            + (f", {r['export_cpu_ms']:.0f} ms CPU each" if r["export_cpu_ms"] else "")
        )


if __name__ == "__main__":
    main()
