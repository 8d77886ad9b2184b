"""One worker process: the gRPC server, its health service, SIGHUP reload and the graceful drain.

SIGTERM/SIGINT drain: the health service (``grpc.health.v1.Health``) turns NOT_SERVING, new
streams are refused (Envoy fails open), in-flight streams get ``shutdownGraceSeconds`` to finish
and report to the observers, then the worker exits 0. :mod:`extproc.server.supervisor` runs one
or several of these.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

from extproc.core.call import CallObserver
from extproc.core.config import Config, ConfigError
from extproc.server.grpc_server import GrpclibServer, build_server, health_only_server
from extproc.server.health import Health
from extproc.server.memory import trim_loop
from extproc.server.processor import Processor
from extproc.server.settings import Settings, settings

log = logging.getLogger("extproc")

ObserverFactory = Callable[[Config], Sequence[CallObserver]]


# Keys a SIGHUP reload cannot change in a running process (sockets, metric label sets).
RESTART_ONLY = ("listen", "health_listen", "stats", "event_loop")

Reloader = Callable[[], Config]


async def run_worker(
    config: Config,
    observers: Sequence[CallObserver],
    grace: float | None = None,
    ready: Callable[[], None] | None = None,
    reload: Reloader | None = None,
    observer_factory: ObserverFactory | None = None,
) -> None:
    grace = config.shutdown_grace_seconds if grace is None else grace
    processor = Processor(config, observers)
    processor.settings.pricer.warm()  # before serving: the first call must not wait for the price catalogue
    server = build_server(processor, config.listen, tls=config.tls)
    health_server = health_only_server(config.health_listen) if config.health_listen else None
    health = Health(server, *([health_server] if health_server else []))
    await health.not_ready()
    if health_server is not None:
        await health_server.start()
    await server.start()
    await health.serving()
    log.info("ext_proc listening", extra={"address": config.listen, "pid": os.getpid()})
    if ready is not None:
        ready()
    trimmer = asyncio.create_task(trim_loop(processor.counters.trim_due, processor.counters.trim_wanted))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None and observer_factory is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: reconfigure(processor, reload, observer_factory))
    await stop.wait()
    trimmer.cancel()
    await drain(server, health, processor, grace)
    if health_server is not None:
        await health_server.stop(0)
    finish_closing()
    close_observers(processor.observers)
    log.info("stopped", extra={"pid": os.getpid()})


class RestartNeeded(ValueError):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"these keys need a restart: {', '.join(keys)}")
        self.keys = keys


def prepare(new: Config, running: Config) -> Settings:
    """Everything a reload checks before anything is applied: keys only a restart can change
    (RestartNeeded), then the servicer's settings (ConfigError). Pure (no threads, no I/O): the
    supervisor runs it too before it adopts a file for the workers it restarts later."""
    changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(running, k)]
    if changed:
        raise RestartNeeded(changed)
    return settings(new)


def reconfigure(processor: Processor, reload: Reloader, observer_factory: ObserverFactory) -> bool:
    """SIGHUP: re-read the config file and apply it without dropping a stream or resetting a
    counter (metric instruments are registered once per process and reused).

    Transactional: the new config, its settings (routes, limits, namespace, provider key) and its
    observers (a tracer and its export thread) are all built aside; only when every part
    succeeded are they swapped in, in one step, and the replaced observers shut down on a thread of
    their own (their threads end): a tracer's shutdown joins its export thread and waits on its
    exporter, seconds with a collector that does not answer, and the event loop must not wait
    with it (every stream would miss Envoy's message timeout). A bad file, a change only a restart can apply, or an observer that cannot be
    built leaves the running state exactly as it was and releases what was built."""
    try:
        new = reload()
        built = prepare(new, processor.settings.config)
    except RestartNeeded as e:
        log.error("config reload: these keys need a restart; keeping the running config", extra={"keys": e.keys})
        return False
    except ConfigError as e:
        log.error("config reload failed; keeping the running config", extra={"error": str(e)})
        return False
    try:
        observers = list(observer_factory(new))  # the factory releases what it built if it fails
    except Exception as e:
        log.error("config reload failed; keeping the running config", extra={"error": f"observers: {type(e).__name__}: {e}"})
        return False
    previous = processor.observers
    processor.apply(built, observers)
    close_later([o for o in previous if o not in observers])  # e.g. the old tracer, off the event loop
    logging.getLogger().setLevel(new.logging.level.upper())
    log.info("config reloaded", extra={"pid": os.getpid()})
    return True


def close_observers(observers: Sequence[CallObserver]) -> None:
    """Flush what observers buffer (spans) before the process exits or they are replaced."""
    for o in observers:
        shutdown = getattr(o, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # a failing flush must not block exit or a reload
                log.exception("observer shutdown failed")


_CLOSING: list[threading.Thread] = []  # replaced observers being shut down (close_later)
CLOSE_WAIT = 10.0  # at exit, how long the last replaced observers may take to flush


def close_later(observers: Sequence[CallObserver]) -> threading.Thread | None:
    """Shut ``observers`` down on a daemon thread: the caller (the event loop) returns at once."""
    if not any(getattr(o, "shutdown", None) is not None for o in observers):
        return None
    _CLOSING[:] = [t for t in _CLOSING if t.is_alive()]
    t = threading.Thread(target=close_observers, args=(list(observers),), name="extproc-observer-close", daemon=True)
    t.start()
    _CLOSING.append(t)
    return t


def finish_closing(timeout: float = CLOSE_WAIT) -> None:
    """At exit: give the replaced observers still shutting down (a reload just before) up to
    ``timeout`` in all to flush, so their spans are not cut off by the process ending."""
    deadline = time.monotonic() + timeout
    for t in _CLOSING:
        t.join(max(0.0, deadline - time.monotonic()))
    _CLOSING.clear()


# How long, after the grace period, we wait for cancelled streams to report (their ``finally``).
REPORT_WAIT = 5.0


async def drain(server: GrpclibServer, health: Health, processor: Processor, grace: float) -> None:
    """Graceful stop: NOT_SERVING, no new streams, in-flight streams finish, every call reported."""
    await health.draining()
    counters = processor.counters
    log.info("draining", extra={"grace_seconds": grace, "active_streams": counters.active})
    # stop() refuses new RPCs at once (GOAWAY; Envoy's ext_proc fails open for requests that start
    # now, they pass unobserved), waits up to `grace` for the streams in flight, then cancels them.
    await server.stop(grace)
    # Observers run in the stream task's `finally` (Stream.finish); a stream cancelled at the deadline
    # gets there as its task unwinds. Don't let the process exit (and lose its metrics) before.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPORT_WAIT
    while counters.active and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if counters.active:
        log.warning("streams still open after drain", extra={"active_streams": counters.active})
