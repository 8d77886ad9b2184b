"""The span export queue (``extproc.telemetry.trace_export.BoundedBatchProcessor``): what
``force_flush`` promises, full batches, drops, and an export thread that sleeps with no timer
while nothing is queued."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from extproc.telemetry.trace_export import SPANS_DROPPED, BoundedBatchProcessor


class _SlowExporter(SpanExporter):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.exported: list[Any] = []
        self.started = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.started.set()
        time.sleep(self.seconds)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _processor(exporter: SpanExporter, delay_s: float = 60.0) -> BoundedBatchProcessor:
    return BoundedBatchProcessor(exporter, list, max_queue_size=100, max_batch=50, delay_s=delay_s)


def test_force_flush_right_after_adding_waits_for_the_spans_to_be_exported() -> None:
    exporter = _SlowExporter(0.05)
    processor = _processor(exporter)  # the thread would otherwise sleep for a minute
    try:
        processor.add("a")
        processor.add("b")
        assert processor.force_flush(5000) is True
        assert exporter.exported == ["a", "b"]
    finally:
        processor.shutdown()


def test_force_flush_waits_for_a_batch_taken_but_not_yet_sent() -> None:
    exporter = _SlowExporter(0.2)
    processor = _processor(exporter, delay_s=0.05)
    try:
        processor.add("a")
        assert exporter.started.wait(5)  # the timer sent it: the batch has left the queue
        assert processor.force_flush(5000) is True
        assert exporter.exported == ["a"]
    finally:
        processor.shutdown()


def test_force_flush_reports_failure_when_the_export_outlasts_the_timeout() -> None:
    exporter = _GatedExporter()  # the export lasts until the gate opens (5 s at most)
    processor = _processor(exporter)
    try:
        processor.add("a")
        assert processor.force_flush(100) is False  # back at its timeout, the export still under way
        assert exporter.batches == []
    finally:
        exporter.gate.set()
        processor.shutdown()


class _GatedExporter(SpanExporter):
    """Records each batch; the first export waits for ``gate`` (the spans are all queued by then)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.gate.wait(5)
        self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _wait_for(predicate: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class _ManualTimer(threading.Event):
    """The export thread's wake-up event with a timer the test runs out: ``wait(timeout)``
    returns True once set, and False only when the test calls ``expire()``, so that the timer
    has not fired yet holds however long the test is kept from running on a loaded machine."""

    def __init__(self) -> None:
        super().__init__()
        self._expired = threading.Event()
        self.parked = False  # a wait() under way, nothing set
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        while not self.is_set():
            if self._expired.is_set():
                self._expired.clear()
                self.parked = False
                return False
            self.parked = True
            time.sleep(0.002)
        self.parked = False
        return True

    def expire(self) -> None:
        self._expired.set()


def test_a_full_batch_sends_only_full_batches_and_the_rest_waits_for_the_timer() -> None:
    """Woken because a batch filled, the thread sends full batches only: the spans that came in
    meanwhile are not sent a few at a time (each export is a gRPC call), they wait for the next
    full batch or the schedule delay."""
    exporter = _GatedExporter()
    processor = _processor(exporter, delay_s=0.5)
    timer = _ManualTimer()
    first, processor._wake = processor._wake, timer
    first.set()  # the thread leaves its first wait (nothing queued) and waits on the timer
    try:
        assert _wait_for(lambda: timer.parked)
        for i in range(90):
            processor.add(i)
        exporter.gate.set()
        # The thread is back waiting (on the timer, which has not fired): the last 40 are queued.
        assert _wait_for(lambda: len(exporter.batches) == 1 and timer.parked)
        assert [len(b) for b in exporter.batches] == [50] and timer.timeouts[-1] == 0.5
        timer.expire()
        assert _wait_for(lambda: len(exporter.batches) == 2)  # the timer sends the rest
        assert exporter.batches[1] == list(range(50, 90))
    finally:
        processor.shutdown()


def test_force_flush_sends_a_part_batch_left_after_a_full_one() -> None:
    exporter = _GatedExporter()
    processor = _processor(exporter)  # the timer: a minute away
    try:
        for i in range(70):
            processor.add(i)
        exporter.gate.set()
        assert _wait_for(lambda: len(exporter.batches) >= 1)
        assert processor.force_flush(5000) is True
        assert [len(b) for b in exporter.batches] == [50, 20]
    finally:
        processor.shutdown()


def _voluntary_switches(thread: threading.Thread) -> int:
    """How many times the thread has gone to sleep (each sleep ended is a wake-up)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def _sleeps_over(processor: BoundedBatchProcessor, seconds: float) -> int:
    before = _voluntary_switches(processor._thread)
    time.sleep(seconds)
    return _voluntary_switches(processor._thread) - before


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_an_idle_processor_thread_does_not_wake() -> None:
    """Nothing queued: the export thread sleeps with no timer, not one wake-up per schedule delay
    (each costs ~50-100 us of CPU on a small VM)."""
    processor = _processor(_SlowExporter(0), delay_s=0.01)
    try:
        time.sleep(0.05)  # the thread reaches its first wait
        woken = _sleeps_over(processor, 0.3)
        assert woken <= 1, f"the idle export thread woke {woken} times in 30 schedule delays"
    finally:
        processor.shutdown()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_the_thread_sleeps_again_once_a_delay_passes_with_nothing_queued() -> None:
    exporter = _SlowExporter(0)
    processor = _processor(exporter, delay_s=0.01)
    try:
        processor.add("a")
        assert _wait_for(lambda: exporter.exported == ["a"])
        time.sleep(0.1)  # the one timed wait that finds the queue empty ends, the thread parks
        woken = _sleeps_over(processor, 0.3)
        assert woken <= 2, f"the export thread woke {woken} times in 30 schedule delays after its last span"
    finally:
        processor.shutdown()


def test_a_span_added_to_a_sleeping_thread_is_sent_one_schedule_delay_after_it_came() -> None:
    """The span wakes the thread, which then waits the schedule delay (the timer counts from the
    span's arrival), exports, and sleeps with no timer again once a delay passes with nothing."""
    exporter = _SlowExporter(0)
    processor = _processor(exporter, delay_s=0.5)
    timer = _ManualTimer()
    first, processor._wake = processor._wake, timer
    first.set()  # the thread leaves its first wait (nothing queued) and waits on the timer
    try:
        assert _wait_for(lambda: timer.parked and timer.timeouts == [None]), timer.timeouts
        processor.add("a")
        assert _wait_for(lambda: timer.parked and timer.timeouts == [None, 0.5]), timer.timeouts
        assert exporter.exported == []  # not before its delay
        timer.expire()
        assert _wait_for(lambda: exporter.exported == ["a"])
        assert _wait_for(lambda: timer.parked and timer.timeouts == [None, 0.5, 0.5]), timer.timeouts
        timer.expire()  # a delay with nothing queued
        assert _wait_for(lambda: timer.parked and timer.timeouts == [None, 0.5, 0.5, None]), timer.timeouts
    finally:
        processor.shutdown()


def test_spans_coming_within_each_delay_are_sent_on_the_timer_without_sleeping_in_between() -> None:
    """While spans keep coming the thread wakes once a delay, as before: no wake-up per span."""
    exporter = _SlowExporter(0)
    processor = _processor(exporter, delay_s=0.5)
    timer = _ManualTimer()
    first, processor._wake = processor._wake, timer
    first.set()
    try:
        assert _wait_for(lambda: timer.parked and timer.timeouts == [None])
        for round_ in range(3):
            processor.add(round_)
            processor.add(f"{round_}b")
            assert _wait_for(lambda: timer.parked and len(timer.timeouts) == round_ + 2), timer.timeouts
            timer.expire()
            assert _wait_for(lambda: len(exporter.exported) == 2 * round_ + 2)
        assert _wait_for(lambda: timer.parked and len(timer.timeouts) == 5)
        assert timer.timeouts == [None, 0.5, 0.5, 0.5, 0.5]
        assert exporter.exported == [0, "0b", 1, "1b", 2, "2b"]
    finally:
        processor.shutdown()


def test_shutdown_of_a_sleeping_processor_sends_what_is_queued_and_ends_the_thread() -> None:
    exporter = _SlowExporter(0)
    processor = _processor(exporter)  # the timer: a minute away
    processor.add("a")
    started = time.monotonic()
    processor.shutdown()
    assert not processor._thread.is_alive() and time.monotonic() - started < 4
    assert exporter.exported == ["a"]
    idle = _processor(exporter)
    idle.shutdown()
    assert not idle._thread.is_alive()


def test_a_full_queue_drops_the_oldest_and_counts_them() -> None:
    exporter = _GatedExporter()
    exporter.gate.set()
    processor = BoundedBatchProcessor(exporter, list, max_queue_size=10, max_batch=50, delay_s=60)
    dropped = SPANS_DROPPED.labels("queue_full")._value.get()
    try:
        for i in range(15):
            processor.add(i)
        assert SPANS_DROPPED.labels("queue_full")._value.get() - dropped == 5
        assert processor.force_flush(5000) is True
        assert exporter.batches == [list(range(5, 15))]
    finally:
        processor.shutdown()
