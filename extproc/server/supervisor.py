"""``extproc serve``: one worker in this process, or several forked workers and a supervisor.

With ``workers > 1`` the parent forks the workers before any gRPC state exists; each binds the
same TCP port with SO_REUSEPORT (the kernel spreads Envoy's HTTP/2 connections over them) and the
parent supervises: a worker that dies is restarted, SIGTERM/SIGINT are passed on (each worker
drains, see :mod:`extproc.server.worker`), SIGHUP makes every worker reload its config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from extproc.core.config import Config
from extproc.server.worker import REPORT_WAIT, ObserverFactory, Reloader, prepare, run_worker

log = logging.getLogger("extproc")


def serve(
    config: Config,
    workers: int,
    observer_factory: ObserverFactory,
    grace: float | None = None,
    on_worker_exit: Callable[[int], None] | None = None,
    reload: Reloader | None = None,
) -> int:
    """Run ``workers`` worker processes (1: this process). ``on_worker_exit(pid)`` runs in the
    supervising parent whenever a worker exits (metrics: prometheus-client ``mark_process_dead``).
    ``reload`` re-reads the config on SIGHUP (each worker applies it; see ``reconfigure``)."""
    if workers <= 1:
        run_loop(config, run_worker(config, observer_factory(config), grace, reload=reload, observer_factory=observer_factory))
        return 0
    if config.listen.startswith("unix:"):
        log.error("several workers need a TCP listen address (SO_REUSEPORT); got %s", config.listen)
        return 2
    return _supervise(config, workers, observer_factory, config.shutdown_grace_seconds if grace is None else grace, on_worker_exit, reload)


def run_loop(config: Config, main: Coroutine[Any, Any, Any]) -> None:
    """Run a worker's ``main`` on the configured event loop (``eventLoop``)."""
    if config.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def _supervise(
    config: Config,
    workers: int,
    observer_factory: ObserverFactory,
    grace: float,
    on_worker_exit: Callable[[int], None] | None = None,
    reload: Reloader | None = None,
) -> int:
    children: dict[int, int] = {}  # pid -> slot
    exits = ChildExits()
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child: its own event loop and gRPC server, nothing inherited but config
            exits.close()  # its copies of the siblings' pidfds
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its event loop installs the reload handler
            code = 0
            try:
                run_loop(config, run_worker(config, observer_factory(config), grace, reload=reload, observer_factory=observer_factory))
            except BaseException:
                log.exception("worker failed")
                code = 1
            os._exit(code)
        children[pid] = slot
        exits.watch(pid)

    stop_deadline = float("inf")

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, stop_deadline
        if not stopping:
            stop_deadline = time.monotonic() + grace + REPORT_WAIT + 5
        stopping = True
        exits.wake()  # the wait looks at the new stop deadline
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def on_hup(_signum: int, _frame: object) -> None:
        # Workers reload themselves; the parent keeps the new config for workers it restarts later.
        # It adopts the file only if the workers' own check (``prepare``) accepts it: a rejected
        # file must not become the config of the next worker restarted (which would then fail).
        nonlocal config
        if reload is not None:
            try:
                new = reload()
                prepare(new, config)
                config = new
            except ValueError:  # ConfigError / RestartNeeded: the workers log it
                pass
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    for n in range(workers):
        spawn(n)
    restarts: list[float] = []
    killed = False
    # Wait for a worker's exit with a timeout rather than block in os.wait(): after SIGTERM the
    # parent must notice a worker that overstays its grace period. (The parent lives on until every
    # worker has exited, so anything it serves, such as multiprocess /metrics, stays up while the
    # workers drain.)
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if stopping and not killed and time.monotonic() > stop_deadline:
                log.error("workers still running after the grace period; killing them", extra={"pids": list(children)})
                killed = True
                for child in list(children):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            exits.wait(max(ChildExits.POLL, stop_deadline - time.monotonic()) if stopping else None)
            continue
        exits.forget(pid)
        slot: int | None = children.pop(pid) if pid in children else None
        if slot is not None and on_worker_exit is not None:
            on_worker_exit(pid)
        if slot is None or stopping:
            continue
        log.warning("worker exited; restarting", extra={"pid": pid, "status": status})
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10 * workers:
            log.error("workers keep dying; giving up")
            on_signal(signal.SIGTERM, None)
            continue
        spawn(slot)
    exits.close()
    return 1 if killed else 0


class ChildExits:
    """Sleep until a worker exits or a stop signal arrives: one wake-up per worker exit or signal
    instead of a poll every 50 ms.

    Why: the supervisor idles for the process's whole life beside workers that serve every call,
    and 20 polls a second cost it ~0.8 ms of CPU a second, ~3 us per streamed chunk at 250 chunks
    a second, charged to the sidecar like any CPU it spends. Each worker gets a pidfd (Linux 5.3+),
    readable once the worker has exited. A signal's handler runs during the wait, which then goes
    on (PEP 475); so ``wake()``, called from the handler, writes to a pipe the wait also watches,
    and the loop looks at the stop deadline at once. Where ``pidfd_open`` is missing or refused
    (another OS, an old kernel, a seccomp filter) the wait falls back to the 50 ms poll.
    """

    POLL = 0.05  # seconds between two waitpid polls without pidfds

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}  # pid -> pidfd
        self._poll: select.poll | None = None
        self._pipe: tuple[int, int] | None = None
        if hasattr(os, "pidfd_open"):
            self._poll = select.poll()
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)
            self._poll.register(self._pipe[0], select.POLLIN)

    def watch(self, pid: int) -> None:
        if self._poll is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self.close()  # no pidfds here: poll for every worker from now on
            return
        self._fds[pid] = fd
        self._poll.register(fd, select.POLLIN)

    def forget(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            if self._poll is not None:
                self._poll.unregister(fd)
            os.close(fd)

    def wake(self) -> None:
        """End the current or next wait (safe in a signal handler)."""
        if self._pipe is not None:
            try:
                os.write(self._pipe[1], b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups not read yet: one is enough
                pass

    def wait(self, timeout: float | None) -> None:
        """Return once a watched worker has exited (not reaped: the caller's waitpid does), on
        ``wake()``, or after ``timeout`` seconds (None: no limit; ``POLL`` at most without pidfds)."""
        if self._poll is None or not self._fds:
            time.sleep(self.POLL if timeout is None else min(timeout, self.POLL))
            return
        if self._poll.poll(None if timeout is None else timeout * 1000) and self._pipe is not None:
            try:
                os.read(self._pipe[0], 4096)
            except BlockingIOError:  # a worker's exit woke it, not a signal
                pass

    def close(self) -> None:
        for pid in list(self._fds):
            self.forget(pid)
        self._poll = None
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
