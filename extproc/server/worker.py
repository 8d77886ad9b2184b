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
from collections.abc import Callable, Sequence

from extproc.core.call import CallObserver
from extproc.core.config import Config
from extproc.server.grpc_server import GrpclibServer, build_server, health_only_server
from extproc.server.health import Health
from extproc.server.processor import Processor

log = logging.getLogger("extproc")

ObserverFactory = Callable[[Config], Sequence[CallObserver]]


# Keys a SIGHUP reload cannot change in a running process (sockets, metric label sets).
RESTART_ONLY = ("listen", "health_listen", "stats")

Reloader = Callable[[], Config]


async def run_worker(config: Config, observers: Sequence[CallObserver], grace: float | None = None,
                     ready: Callable[[], None] | None = None, reload: Reloader | None = None,
                     observer_factory: ObserverFactory | None = None) -> None:
    grace = config.shutdown_grace_seconds if grace is None else grace
    processor = Processor(config, observers)
    processor.pricer.warm()  # before serving: the first call must not wait for the price catalogue
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None and observer_factory is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: reconfigure(processor, reload, observer_factory))
    await stop.wait()
    await drain(server, health, processor, grace)
    if health_server is not None:
        await health_server.stop(0)
    close_observers(processor.observers)
    log.info("stopped", extra={"pid": os.getpid()})


def reconfigure(processor: Processor, reload: Reloader, observer_factory: ObserverFactory) -> bool:
    """SIGHUP: re-read the config file and apply it without dropping a stream or resetting a
    counter (metric instruments are registered once per process and reused). A bad file, or a
    change to a key only a restart can apply, leaves the running config in place."""
    from extproc.core.config import ConfigError

    try:
        new = reload()
    except ConfigError as e:
        log.error("config reload failed; keeping the running config", extra={"error": str(e)})
        return False
    old = processor.config
    changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(old, k)]
    if changed:
        log.error("config reload: these keys need a restart; keeping the running config", extra={"keys": changed})
        return False
    previous = processor.observers
    try:
        processor.reconfigure(new, observer_factory(new))
    except ConfigError as e:
        log.error("config reload failed; keeping the running config", extra={"error": str(e)})
        return False
    close_observers([o for o in previous if o not in processor.observers])  # e.g. the old tracer
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


# How long, after the grace period, we wait for cancelled streams to report (their ``finally``).
REPORT_WAIT = 5.0


async def drain(server: GrpclibServer, health: Health, processor: Processor, grace: float) -> None:
    """Graceful stop: NOT_SERVING, no new streams, in-flight streams finish, every call reported."""
    await health.draining()
    log.info("draining", extra={"grace_seconds": grace, "active_streams": processor.active})
    # stop() refuses new RPCs at once (GOAWAY; Envoy's ext_proc fails open for requests that start
    # now, they pass unobserved), waits up to `grace` for the streams in flight, then cancels them.
    await server.stop(grace)
    # Observers run in Process()'s `finally` (Stream.finish); a stream cancelled at the deadline
    # gets there as its task unwinds. Don't let the process exit (and lose its metrics) before.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPORT_WAIT
    while processor.active and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if processor.active:
        log.warning("streams still open after drain", extra={"active_streams": processor.active})
