"""A worker's process-wide settings while it serves."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

from extproc.core.config import parse
from extproc.devtools.dev import free_port
from extproc.server import worker


def test_a_serving_worker_starts_garbage_collections_less_often():
    """Once serving, the collector's first threshold is ``GC_FIRST_THRESHOLD`` (the calls in
    flight alone no longer start collections), the other two thresholds unchanged."""
    saved = gc.get_threshold()
    config = parse({"listen": f"127.0.0.1:{free_port()}", "stats": {"port": 0}})

    async def main() -> tuple[int, int, int]:
        serving = asyncio.Event()
        run = asyncio.create_task(worker.run_worker(config, [], grace=0, ready=serving.set))
        await asyncio.wait_for(serving.wait(), 10)
        threshold = gc.get_threshold()
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own stop
        await asyncio.wait_for(run, 10)
        return threshold

    try:
        gc.set_threshold(700, 11, 12)
        assert asyncio.run(main()) == (worker.GC_FIRST_THRESHOLD, 11, 12)
        assert worker.GC_FIRST_THRESHOLD > 700
    finally:
        gc.set_threshold(*saved)
