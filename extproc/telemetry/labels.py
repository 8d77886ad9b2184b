"""Label values for the AI metrics: custom labels read from what Envoy forwards, and a cap on
how many distinct values any one label may take.

Custom label values come only from dynamic metadata Envoy forwarded (``Call.forwarded``: for
jwt_authn, claims of a token Envoy verified), from a configured request header, or from a call's
attribution (end user, session, key id: ``extproc.core.attribution``); the sidecar never decodes
``Authorization`` itself, so a label cannot be forged with an unverified token.
"""

from __future__ import annotations

from typing import Any

from extproc.core.bounded import MAX_VALUE_CHARS
from extproc.core.call import Call
from extproc.core.config import CustomLabel

__all__ = ["MAX_VALUE_CHARS", "OVERFLOW", "LabelGuard", "LabelSource", "metadata_value"]

OVERFLOW = "__overflow__"


class LabelSource:
    """Reads one custom label's value from a finished call ("" when absent)."""

    __slots__ = ("name", "_namespace", "_path", "_header", "_field")

    def __init__(self, cfg: CustomLabel) -> None:
        self.name = cfg.name
        self._namespace = cfg.metadata_namespace
        self._path = tuple(k for k in (cfg.metadata_key or "").split(cfg.key_delimiter) if k)
        self._header = cfg.header.lower() if cfg.header else None
        self._field = cfg.field

    def value(self, call: Call) -> str:
        if self._field is not None:  # end_user, session_id, key_id: already cut to 128 characters
            return getattr(call, self._field) or ""
        if self._header is not None:
            return call.headers.get(self._header, "")[:MAX_VALUE_CHARS]
        return metadata_value(call.forwarded, self._namespace, self._path)[:MAX_VALUE_CHARS]


def metadata_value(forwarded: Any, namespace: str, path: tuple[str, ...]) -> str:
    """``forwarded[namespace]`` (a google.protobuf.Struct) walked along ``path``, as a string.

    ``forwarded`` is ProcessingRequest.metadata_context.filter_metadata (or any mapping of
    namespace -> Struct). Strings, numbers and booleans become label values; anything else, or a
    missing key, is "".
    """
    if forwarded is None or not path or namespace not in forwarded:  # `in`: a lookup would insert
        return ""
    fields = forwarded[namespace].fields
    last = len(path) - 1
    for i, key in enumerate(path):
        if key not in fields:
            return ""
        value = fields[key]
        kind = value.WhichOneof("kind")
        if i < last:
            if kind != "struct_value":
                return ""
            fields = value.struct_value.fields
            continue
        if kind == "string_value":
            return value.string_value
        if kind == "number_value":
            n = value.number_value
            return str(int(n)) if n.is_integer() else repr(n)
        if kind == "bool_value":
            return "true" if value.bool_value else "false"
    return ""


class LabelGuard:
    """Caps distinct values per label: past ``limit``, new values fold into ``__overflow__``.

    The cap is per process (with several workers each keeps its own set), so a scrape can show up
    to ``workers * limit`` values of one label. ``overflowed[label]`` counts folds since the last
    :meth:`take_overflows`.
    """

    __slots__ = ("limit", "_seen", "overflowed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self.overflowed: dict[str, int] = {}

    def fold(self, label: str, value: str) -> str:
        seen = self._seen.get(label)
        if seen is None:
            seen = self._seen[label] = set()
        if value in seen or value == "":
            return value
        if len(seen) < self.limit:
            seen.add(value)
            return value
        self.overflowed[label] = self.overflowed.get(label, 0) + 1
        return OVERFLOW

    def take_overflows(self) -> dict[str, int]:
        out, self.overflowed = self.overflowed, {}
        return out


_WORKERS = 1  # processes sharing one stats.maxSeries (set by `extproc serve` before it forks them)


def share_among(workers: int) -> None:
    """Divide every series budget built from now on among ``workers`` worker processes, so the
    sidecar as a whole keeps ``stats.maxSeries`` per family, not ``workers`` times it. Called
    once, before the workers fork (they inherit it)."""
    global _WORKERS
    _WORKERS = max(1, workers)


def worker_share(limit: int) -> int:
    """This worker's part of a per-process budget of ``limit`` series (at least 1)."""
    return max(1, limit // _WORKERS)


class SeriesBudget:
    """Caps the live series of each metric family, as Prometheus counts them (one per counter
    label set; one per bucket plus _sum and _count per histogram label set): a label set that
    would take a family past ``limit`` is recorded in the family's ``__overflow__`` label set
    instead (see :func:`folded`).

    The sidecar's: with several workers each keeps ``limit / workers`` (:func:`share_among`), so
    their union, the exposition and a collector's view, stays within ``limit``. Admitting a label set already live is one set lookup;
    the budget is consulted only when a series would be created (callers cache admitted children).
    ``folded[family]`` counts observations folded since the last :meth:`take_folded`.
    """

    __slots__ = ("limit", "_live", "_used", "folded")

    def __init__(self, limit: int) -> None:
        self.limit = worker_share(limit)
        self._live: dict[str, set[tuple[str, ...]]] = {}
        self._used: dict[str, int] = {}
        self.folded: dict[str, int] = {}

    def admit(self, family: str, labels: tuple[str, ...], cost: int = 1) -> bool:
        """``cost``: the series one label set of this family shows (1, or a histogram's lines)."""
        live = self._live.get(family)
        if live is None:
            live = self._live[family] = set()
        if labels in live:
            return True
        used = self._used.get(family, 0)
        if used + cost <= self.limit:
            live.add(labels)
            self._used[family] = used + cost
            return True
        self.folded[family] = self.folded.get(family, 0) + 1
        return False

    def fold(self, family: str) -> None:
        """Count one more observation folded in ``family`` (a label set :meth:`admit` folded
        before: it would fold it again, ``used`` never shrinks)."""
        self.folded[family] = self.folded.get(family, 0) + 1

    def series(self, family: str) -> int:
        """Live series of ``family``, as Prometheus counts them."""
        return self._used.get(family, 0)

    def live(self, family: str) -> int:
        """Live label sets of ``family``."""
        return len(self._live.get(family, ()))

    def take_folded(self) -> dict[str, int]:
        out, self.folded = self.folded, {}
        return out


def folded(labels: tuple[str, ...], keep: tuple[int, ...] = ()) -> tuple[str, ...]:
    """The overflow label set for ``labels``: every value ``__overflow__`` except empty ones and
    the positions in ``keep`` (labels with a fixed, small set of values, e.g. the outcome)."""
    return tuple(v if not v or i in keep else OVERFLOW for i, v in enumerate(labels))
