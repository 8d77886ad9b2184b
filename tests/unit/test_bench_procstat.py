"""The benchmarks' CPU reading: finer than a clock tick, and 0 for a process gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.procstat import cpu_seconds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux process clocks and /proc")


def test_cpu_seconds_resolves_less_than_a_clock_tick():
    tick = 1 / os.sysconf("SC_CLK_TCK")
    before, start = cpu_seconds([os.getpid()]), time.process_time()
    while time.process_time() - start < tick / 4:
        pass
    spent = cpu_seconds([os.getpid()]) - before
    assert tick / 5 <= spent < tick, f"{spent * 1e3:.3f} ms for ~{tick / 4 * 1e3:.1f} ms of CPU (ticks would read 0 or {tick * 1e3:.0f} ms)"


def test_cpu_seconds_counts_a_process_gone_as_zero():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert cpu_seconds([proc.pid]) == 0.0
