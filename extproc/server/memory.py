"""Give memory back to the system after large streams end.

Bodies a parser held, and large gRPC messages, are freed when their stream ends, but glibc keeps
freed heap memory for reuse: measured under grpclib, 16 streams of 4 MiB bodies left a process at
~143 MiB RSS after they had all ended (70 MiB before), round after round. ``malloc_trim(0)``
returns it (62 MiB). The worker calls it at most once a second, and only after a stream held
or received something large since the last call (WorkerCounters.trim_due).

The trimmer sleeps until a stream holds or receives something large (``WorkerCounters.trim_wanted``)
and only then looks once a second until it has trimmed: a timer that fires while the event loop
sleeps is a wake-up of its own, ~100-150 us of CPU on a small VM, which a one-second poll paid
in every idle worker, every second, for nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("extproc")

# Held or received since the last trim, above which the next tick trims.
TRIM_AFTER_BYTES = 1 << 20
INTERVAL = 1.0


def _malloc_trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


malloc_trim = _malloc_trim()


async def trim_loop(due: Callable[[], bool], wanted: asyncio.Event, interval: float = INTERVAL) -> None:
    """Runs for the worker's life: asleep until ``wanted`` is set (something large was held or
    received), then ``due()`` says (and resets) every ``interval`` whether the large buffers were
    freed; once they were, memory is trimmed and the loop sleeps until ``wanted`` again."""
    if malloc_trim is None:
        return
    while True:
        await wanted.wait()
        await asyncio.sleep(interval)
        if due():
            wanted.clear()
            malloc_trim()
