"""Every private prometheus-client detail :mod:`extproc.telemetry.metrics` relies on to record a
value, in one place: a label set's child taken down to the value objects it updates.

``Counter.inc`` checks that the child has its labels and the amount's sign, then increments its
value; ``Histogram.observe`` does the same checks, adds to the sum, and walks the buckets from
the lowest until one holds the value (up to 17 comparisons here). A call updates about a dozen
children. :func:`adder` and :func:`observer` return what does the update alone: the counter's
value's ``inc``; the sum's ``inc`` and the one bucket's, found by bisection (in multiprocess mode
each ``inc`` is the guarded value's ``adder``, :mod:`prometheus_store`). The values are the
same objects (in-process, or the mmap'd files of multiprocess mode, :mod:`prometheus_store`),
so the exposition is the same. Callers guarantee what the checks would refuse: a child of a
labelled metric, a counter amount >= 0 (the measurement step raises for a negative one), and no
exemplar.

``tests/unit/test_prometheus_compat.py`` checks each assumption against the installed release
(pinned in pyproject) and compares the exposition with ``inc``/``observe``'s.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

__all__ = ("adder", "observer", "series_per_label_set")

Record = Callable[[float], None]


def adder(counter_child: Any) -> Record:
    """``counter_child.inc`` for an amount >= 0, without an exemplar; for an unlabelled gauge
    (or a gauge's child), its ``inc``, and with a negative amount its ``dec``."""
    return _inc(counter_child._value)


def observer(histogram_child: Any) -> Record:
    """``histogram_child.observe``, without an exemplar."""
    add_sum = _inc(histogram_child._sum)
    incs = [_inc(b) for b in histogram_child._buckets]
    bounds = histogram_child._upper_bounds  # sorted, the last +Inf
    last = len(bounds)

    def observe(amount: float) -> None:
        add_sum(amount)
        i = bisect_left(bounds, amount)  # the first bound >= amount: the bucket observe's walk stops at
        if i < last and amount <= bounds[i]:  # NaN: no bucket, as in the walk
            incs[i](1)

    return observe


def _inc(value: Any) -> Record:
    """A value's ``inc`` without its lock: in one process, ``MutexValue``'s addition alone; in
    multiprocess mode, the guarded value's ``adder`` (:mod:`prometheus_store`), which also skips
    the process check per update. The lock serialises threads that update one value; these
    values are updated only by the worker's event loop (the endpoint's thread only reads them,
    and a float attribute is read whole)."""
    from prometheus_client.values import MutexValue  # (imported by now: ``value`` is one of its values)

    fast = getattr(value, "adder", None)
    if fast is not None:
        add: Record = fast()
        return add
    if type(value) is not MutexValue:  # a value class of another kind: its own inc
        inc: Record = value.inc
        return inc

    def add_in_process(amount: float) -> None:
        value._value += amount

    return add_in_process


def series_per_label_set(metric: Any) -> int:
    """The series one label set of ``metric`` shows: 1, or a histogram's buckets + _sum + _count."""
    bounds = getattr(metric, "_upper_bounds", None)
    return 1 if bounds is None else len(bounds) + 2
