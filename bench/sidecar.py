"""The sidecar as ``extproc serve`` runs it, plus a counting observer for the benchmark.

Each worker maps a small file ``<counts-dir>/<pid>`` and keeps its totals there (calls ended,
calls whose usage was observed, calls that ended ok, streams refused at ``limits.maxStreams``): the
runner sums them to learn how many calls the sidecar fully observed, and how many it shed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import struct
import sys
from pathlib import Path

from extproc.core import config, logs
from extproc.core.call import Call
from extproc.server import supervisor
from extproc.telemetry import observers as app

FIELDS = ("calls", "observed", "ok", "refused")
_FMT = "<" + "q" * len(FIELDS)


class Counter:
    def __init__(self, directory: str) -> None:
        path = Path(directory) / str(os.getpid())
        with path.open("wb") as f:
            f.write(b"\0" * mmap.PAGESIZE)
        self._fd = os.open(path, os.O_RDWR)
        self._m = mmap.mmap(self._fd, mmap.PAGESIZE)
        self.calls = self.observed = self.ok = self.refused = 0

    def on_call_end(self, call: Call) -> None:
        self.calls += 1
        if call.obs.usage.seen() and call.obs.response_model is not None:
            self.observed += 1
        if call.outcome == "ok":
            self.ok += 1
        self._store()

    def on_stream_refused(self, reason: str) -> None:
        self.refused += 1
        self._store()

    def _store(self) -> None:
        struct.pack_into(_FMT, self._m, 0, self.calls, self.observed, self.ok, self.refused)


def read_counts(directory: str | Path) -> dict[str, int]:
    total = dict.fromkeys(FIELDS, 0)
    for f in Path(directory).iterdir():
        values = struct.unpack_from(_FMT, f.read_bytes(), 0)
        for k, v in zip(FIELDS, values):
            total[k] += v
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--counts", required=True)
    args = ap.parse_args(argv)
    cfg = config.load(args.config)
    logs.setup(cfg.logging.level)

    def observers(c: config.Config) -> list:
        return [*app.observers(c), Counter(args.counts)]

    return supervisor.serve(cfg, args.workers, observers)


if __name__ == "__main__":
    sys.exit(main())
