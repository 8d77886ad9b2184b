"""Multiprocess metric files that fail safe: a full or unwritable metrics directory costs metrics,
never a worker.

prometheus-client (multiprocess mode) keeps each worker's values in files it ``mmap``s, growing a
file by ``truncate`` (sparse) and then writing into the new pages. On a full filesystem (a small
tmpfs) the write to a page that cannot be backed raises SIGBUS and kills the worker; every
respawn dies the same way. Here:

- each file's space is reserved with ``posix_fallocate`` before prometheus-client maps it, when
  it is created and before it grows: a full filesystem answers ENOSPC (an ``OSError``) instead of
  a SIGBUS later;
- every value is wrapped: an ``OSError`` while creating or updating it (no space, no permission,
  a read-only filesystem) makes that value a no-op in this process. The first failure is logged
  once per process with its cause, each lost update is counted (``dropped``, and the
  ``ai_metrics_storage_errors_total`` counter when its own value could still be stored). ext_proc
  keeps serving (fail open).

:func:`install` switches prometheus-client over; ``extproc.telemetry.prometheus_endpoint`` calls it before
the workers fork.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("extproc.telemetry.metrics")

# fallocate cannot tell us anything on these: the filesystem does not support it; go on unreserved.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class _State:
    dropped = 0  # updates (and value creations) that could not be stored, this process
    logged_pid = 0  # the process that logged its first failure
    counter: Any = None  # the storage-errors counter's value, if it could be stored
    lock = threading.Lock()


def dropped() -> int:
    return _State.dropped


def _reserve(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise


def _failed(e: BaseException, what: str) -> None:
    _State.dropped += 1
    pid = os.getpid()
    if _State.logged_pid != pid:
        _State.logged_pid = pid
        log.error(
            "metrics storage failed: values that cannot be stored are dropped; ext_proc keeps serving",
            extra={
                "error": str(e),
                "errno": getattr(e, "errno", None),
                "during": what,
                "pid": pid,
                "dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
            },
        )
    counter = _State.counter
    if counter is not None and counter.alive and not _State.lock.locked():
        with _State.lock:  # the counter's own failure must not recurse
            counter.inc(1)


def install() -> None:
    """Make prometheus-client's multiprocess values fail safe (idempotent)."""
    from prometheus_client import mmap_dict, values

    if getattr(values.ValueClass, "_extproc_safe", False):
        return

    class ReservedMmapedDict(mmap_dict.MmapedDict):
        """prometheus-client's file, with its space reserved before it is mapped or grown."""

        def __init__(self, filename: str, read_mode: bool = False) -> None:
            if not read_mode:
                fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    if os.fstat(fd).st_size == 0:
                        try:
                            _reserve(fd, mmap_dict._INITIAL_MMAP_SIZE)
                        except OSError:
                            os.unlink(filename)  # an empty file would be read as corrupt
                            raise
                finally:
                    os.close(fd)
            super().__init__(filename, read_mode)

        def _init_value(self, key: str) -> None:
            encoded = len(key.encode("utf-8"))
            needed = self._used + 4 + encoded + (8 - (encoded + 4) % 8) + 16  # as the parent computes it
            if needed > self._capacity:
                capacity = self._capacity
                while needed > capacity:
                    capacity *= 2
                _reserve(self._f.fileno(), capacity)  # ENOSPC here, before any page is touched
            super()._init_value(key)

    values.MmapedDict = ReservedMmapedDict  # type: ignore[misc]  # what MultiProcessValue opens files with
    values.ValueClass = safe_value_class(values.MultiProcessValue(process_identifier=_pid))


# prometheus-client asks for the process id on every value update (a fork starts the values
# over): ``os.getpid`` is a system call, ~20 per LLM call. The id only changes across a fork, so
# it is read once and again in each forked child (the workers are forked: extproc.server.supervisor).
_process_id = os.getpid()


def _forked() -> None:
    global _process_id
    _process_id = os.getpid()


os.register_at_fork(after_in_child=_forked)


# prometheus-client's record of one value in a file: the value and its timestamp, two doubles
# (``mmap_dict._pack_two_doubles``, written in place).
_pack_into = struct.Struct("dd").pack_into


def _pid() -> int:
    """``os.getpid()``, without the system call."""
    return _process_id


def safe_value_class(inner: type) -> type:
    """``inner`` (prometheus-client's MmapedValue class) behind a guard: see the module doc."""

    class SafeValue:
        _multiprocess = True
        _extproc_safe = True
        __slots__ = ("_inner", "alive")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner: Any = None
            self.alive = False
            try:
                self._inner = inner(*args, **kwargs)
                self.alive = True
            except OSError as e:
                _failed(e, "create")

        def inc(self, amount: float) -> None:
            if not self.alive:
                _State.dropped += 1
                return
            try:
                self._inner.inc(amount)
            except (OSError, TypeError, ValueError) as e:  # TypeError/ValueError: a file closed by a failed reopen
                self.alive = False
                _failed(e, "update")

        def adder(self) -> Callable[[float], None]:
            """``inc`` for a value updated per call (``prometheus_compat.adder``): the same
            update of the value and of its place in the file, without prometheus-client's
            module-wide lock and process check per update (~0.35 of ~0.55 us; a call makes
            about a dozen). The lock serialises threads, and only the worker's event loop
            updates these values; the check starts a forked child's values over, so an update
            made in another process than the one this was made in goes through ``inc``, which
            does that. A value that has failed, or fails here, takes ``inc``'s path too."""
            value = self._inner
            if not self.alive or value is None:
                return self.inc
            try:
                value.get()  # prometheus-client's process check: a value made before a fork moves to this process's file first
            except (OSError, TypeError, ValueError):
                return self.inc  # ``inc`` meets the failure again, and counts it
            born = _process_id
            file, inc = value._file, self.inc
            pos = file._positions[value._key]  # a value's place in its file never moves (growth appends)

            def add(amount: float) -> None:
                if _process_id != born or not self.alive:
                    inc(amount)
                    return
                try:
                    value._value = total = value._value + amount
                    value._timestamp = 0.0
                    _pack_into(file._m, pos, total, 0.0)  # file._m is remapped when the file grows
                except (OSError, TypeError, ValueError) as e:  # as in ``inc``
                    self.alive = False
                    _failed(e, "update")

            return add

        def set(self, value: float, timestamp: float | None = None) -> None:
            if not self.alive:
                _State.dropped += 1
                return
            try:
                self._inner.set(value, timestamp)
            except (OSError, TypeError, ValueError) as e:
                self.alive = False
                _failed(e, "update")

        def set_exemplar(self, exemplar: Any) -> None:
            return

        def get(self) -> float:
            if not self.alive:
                return 0.0
            try:
                return float(self._inner.get())
            except (OSError, TypeError, ValueError):
                return 0.0

        def get_exemplar(self) -> Any:
            return None

    return SafeValue


def register_counter(registry: Any) -> None:
    """``ai_metrics_storage_errors_total`` in ``registry`` (once per process), created while the
    directory still has room so that later failures can be counted there."""
    from prometheus_client import Counter, values

    if not getattr(values.ValueClass, "_extproc_safe", False) or _State.counter is not None:
        return
    c = Counter(
        "ai_metrics_storage_errors",
        "Metric updates a worker could not store (metrics directory full or unwritable); the first failure is logged with its cause",
        registry=registry,
    )
    _State.counter = c._value
