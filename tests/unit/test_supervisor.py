"""The supervisor's wait for its workers: woken by a worker's exit, asleep otherwise, and still
killing workers that overstay the stop deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from extproc.devtools.dev import free_port, wait_port
from extproc.server.supervisor import ChildExits

REPO = Path(__file__).resolve().parents[2]


def _child(seconds: float) -> int:
    pid = os.fork()
    if pid == 0:
        time.sleep(seconds)
        os._exit(0)
    return pid


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux-only; elsewhere the wait polls")
def test_wait_sleeps_its_whole_timeout_while_the_workers_run():
    exits, pid = ChildExits(), _child(60)
    try:
        exits.watch(pid)
        start = time.monotonic()
        exits.wait(0.5)
        assert time.monotonic() - start >= 0.45, "a 50 ms poll would wake the supervisor 20 times a second"
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        exits.close()
        _reap(pid)


def test_wait_returns_when_a_watched_worker_exits():
    exits, pid = ChildExits(), _child(0.2)
    try:
        exits.watch(pid)
        start = time.monotonic()
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            exits.wait(30)
            assert time.monotonic() - start < 10, "the worker's exit did not end the wait"
        exits.forget(pid)
        assert not exits._fds
    finally:
        exits.close()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux-only; elsewhere the wait polls")
def test_wake_ends_a_wait_without_limit_and_only_one():
    exits, pid = ChildExits(), _child(60)
    try:
        exits.watch(pid)
        exits.wake()
        exits.wake()
        start = time.monotonic()
        exits.wait(None)
        assert time.monotonic() - start < 5, "a wake-up (from a signal handler) must end the wait"
        exits.wait(0.3)
        assert time.monotonic() - start >= 0.25, "the wake-ups were read: the next wait sleeps again"
    finally:
        exits.close()
        _reap(pid)


def test_wait_falls_back_to_polling_where_pidfds_are_refused(monkeypatch):
    def refused(pid: int) -> int:
        raise PermissionError("seccomp")

    monkeypatch.setattr(os, "pidfd_open", refused, raising=False)
    exits, pid = ChildExits(), _child(60)
    try:
        exits.watch(pid)
        start = time.monotonic()
        exits.wait(30)
        assert time.monotonic() - start < 5, "without pidfds the wait must poll, not sleep its timeout"
    finally:
        exits.close()
        _reap(pid)


def _ctxt_switches(pid: int) -> int:
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_an_idle_supervisor_does_not_wake():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2", "--metrics-port", "0"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc=proc)
        time.sleep(0.5)
        before = _ctxt_switches(proc.pid)
        time.sleep(3)
        woken = _ctxt_switches(proc.pid) - before
        assert woken <= 2, f"the supervisor's main thread woke {woken} times in 3 s (a 50 ms poll: ~60)"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


STUBBORN = textwrap.dedent(
    """
    import os, signal, sys, time
    from extproc.core.config import Config
    from extproc.server import supervisor

    def stubborn(config, main):
        main.close()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(1, b"worker\\n")  # one write: the two workers' lines never interleave
        time.sleep(600)

    supervisor.run_loop = stubborn
    supervisor.REPORT_WAIT = 0.0
    config = Config.model_validate({"listen": "127.0.0.1:1"})
    sys.exit(supervisor._supervise(config, 2, lambda c: [], grace=0.2))
    """
)


def test_workers_that_overstay_the_stop_deadline_are_killed():
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(2):
            assert proc.stdout.readline() == "worker\n"
        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 1, proc.stderr.read() if proc.stderr else ""
        # deadline: grace 0.2 + 5 s from the signal, which wakes the wait to look at it
        assert 5.0 <= time.monotonic() - stop < 5.2 + 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
