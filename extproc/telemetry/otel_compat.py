"""Every private OpenTelemetry metrics SDK detail :mod:`extproc.telemetry.otlp_metrics` relies on,
in one place: recording a value straight into the SDK's aggregation of one attribute set.

``Counter.add`` / ``Histogram.record`` cost ~8 us each in the SDK, nearly all of it spent on the
attributes, again for every value: a ``Measurement`` that cleans (copies and validates) them, the
exemplar filter, a copy per view, a sorted, type-tagged hash to find the attribute set's
aggregation. A call records about a dozen values under a handful of attribute sets that repeat
from call to call. A :class:`Bound` does that work once per (instrument, attribute set): it finds
the aggregation as the SDK does (same key, same cardinality limit and overflow set, created at the
first value as the SDK creates it, so the same start time) and keeps it; each value is then the
aggregation's own ``aggregate``, the same arithmetic on the same object, so every exported point
is the SDK's. With delta temporality the SDK swaps in fresh aggregations at each collection (under
the view match's lock): a :class:`Bound` notices and finds the new one, under the same lock.

Exemplars are off (:data:`EXEMPLAR_FILTER`, which the MeterProvider must be built with): the value
is offered to no reservoir, as the SDK's own path does with that filter.

``tests/unit/test_otel_compat.py`` checks each assumption against the installed SDK (pinned in
pyproject with the exporters), and ``tests/unit/test_otlp_metrics.py`` that the exported metrics
equal the plain SDK API's, point by point, so an upgrade that moves one fails a named test.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.attributes import _clean_attribute_value
from opentelemetry.sdk.metrics import UpDownCounter
from opentelemetry.sdk.metrics._internal._view_instrument_match import _hash_attributes, _ViewInstrumentMatch
from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter

__all__ = ("EXEMPLAR_FILTER", "Bound", "view_matches")

EXEMPLAR_FILTER = AlwaysOffExemplarFilter()
_INF = float("inf")


class _Value:
    """What an aggregation reads of a measurement when no exemplar is sampled: its value."""

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value


def view_matches(instrument: Any) -> list[_ViewInstrumentMatch]:
    """The SDK's per-(reader, view) state of ``instrument``, where its aggregations live: what
    ``instrument.add``/``record`` feeds. Readers must not be added later (ours never are)."""
    out: list[_ViewInstrumentMatch] = []
    for storage in instrument._measurement_consumer._reader_storages.values():
        out.extend(storage._get_or_init_view_instrument_match(instrument))
    return out


class _Slot:
    """One view match's aggregation of the attribute set, found at the first value."""

    __slots__ = ("match", "key", "attributes", "reset", "aggregations", "aggregation")

    def __init__(self, match: _ViewInstrumentMatch, attributes: dict[str, Any]) -> None:
        keys = match._view._attribute_keys
        if keys is not None:
            attributes = {k: v for k, v in attributes.items() if k in keys}
        self.match = match
        self.attributes = attributes
        self.key = _hash_attributes(attributes)
        self.reset: bool = match._reset_on_collect  # delta: aggregations replaced at each collection
        self.aggregations: Any = None  # the match's dict self.aggregation was found in
        self.aggregation: Any = None

    def find(self) -> Any:
        """The aggregation (the caller holds the match's lock), as ``consume_measurement`` finds it."""
        match = self.match
        self.aggregations = match._attributes_aggregation
        self.aggregation = match._get_or_create_aggregation(self.key, dict(self.attributes))
        return self.aggregation


class Bound:
    """``instrument`` with ``attributes`` fixed: :meth:`add` is ``instrument.add(value,
    attributes)`` (or ``record``) for an enabled instrument (no meter configurator disables one
    here). A value the instrument would refuse (not finite; negative, but for an up-down counter)
    is dropped as the SDK drops it (without its warning)."""

    __slots__ = ("_instrument", "_attributes", "_slots", "_signed")

    def __init__(self, instrument: Any, attributes: dict[str, Any] | None) -> None:
        cleaned = _clean_attribute_value(attributes, None) if attributes is not None else None  # as Measurement does
        self._instrument = instrument
        self._attributes: dict[str, Any] = dict(cleaned) if cleaned else {}
        self._slots: tuple[_Slot, ...] | None = None  # at the first value: the SDK meets an instrument then (export order)
        self._signed = isinstance(instrument, UpDownCounter)

    def add(self, value: float) -> None:
        if self._signed:
            if not -_INF < value < _INF:
                return
        elif not (value >= 0 and value < _INF):  # NaN fails both; -0.0 passes, as `amount < 0` lets it
            return
        m = _Value(value)
        slots = self._slots
        if slots is None:
            slots = self._slots = tuple(_Slot(match, self._attributes) for match in view_matches(self._instrument))
        for slot in slots:
            if slot.reset:  # the collection thread may swap the aggregations: hold the lock, as the SDK does
                match = slot.match
                with match._lock:
                    if slot.aggregations is match._attributes_aggregation:
                        slot.aggregation.aggregate(m, False)
                    else:
                        slot.find().aggregate(m, False)
            else:
                aggregation = slot.aggregation
                if aggregation is None:
                    with slot.match._lock:
                        aggregation = slot.find()
                aggregation.aggregate(m, False)
