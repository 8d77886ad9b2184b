"""Scrape time and size of /metrics with N series (sample lines), multiprocess mode as served by
``extproc serve --workers 2``: two worker processes record calls with distinct models until the
exposition holds N series, then the parent's endpoint is scraped.

    python -m bench.scrape_cost              # 10,000 series
    python -m bench.scrape_cost --series 50000

Prints: series, exposition bytes, a cold scrape (renders), a warm one (within
renderIntervalSeconds: the shared render), and 4 concurrent cold scrapes (one render between them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
import urllib.request

LINES_PER_CALL = 52  # requests, prompt, completion, duration histogram (19), token usage x2 (15 each)


def record(calls: range) -> None:
    from extproc.core import config
    from extproc.core.call import OK, Call
    from extproc.telemetry.metrics import MetricsObserver, process_registry

    stats = config.parse({"stats": {"maxSeries": 1_000_000, "maxLabelValues": 1_000_000}}).stats
    obs = MetricsObserver(stats, process_registry())
    for i in calls:
        c = Call(provider="openai", api="openai.chat", status=200, outcome=OK, start=0.0, end=0.5)
        c.obs.operation, c.obs.request_model = "chat", f"bench-model-{i:06d}"
        c.obs.usage.input_tokens, c.obs.usage.output_tokens = 10, 20
        obs.on_call_end(c)
    assert obs.failures == 0


def scrape(port: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120) as r:
        n = len(r.read())
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=10_000)
    args = ap.parse_args()
    from extproc.core import config
    from extproc.telemetry.prometheus_endpoint import Runtime

    runtime = Runtime(config.parse({"stats": {"port": 0, "renderIntervalSeconds": 1.0}}).stats, workers=2)
    try:
        calls = max(args.series // LINES_PER_CALL, 1)
        pids = []
        for half in (range(0, calls // 2), range(calls // 2, calls)):
            pid = os.fork()
            if pid == 0:
                record(half)
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        port = runtime.endpoint.port
        cold, size = scrape(port)
        warm, _ = scrape(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
            series = sum(1 for line in r.read().decode().splitlines() if line and not line.startswith("#"))
        time.sleep(1.1)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: scrape(port)[1], range(4)))
        together = time.perf_counter() - t0
        renders = runtime.endpoint.exposition.renders
        print(f"series (sample lines): {series:,}   exposition: {size / 1e6:.2f} MB")
        print(f"cold scrape (render): {cold * 1000:.0f} ms   warm scrape (shared render): {warm * 1000:.1f} ms")
        print(f"4 concurrent cold scrapes: {together * 1000:.0f} ms, {len(codes)} answered, {renders} renders in all")
    finally:
        runtime.close()


if __name__ == "__main__":
    main()
