"""``extproc spend``: LLM spend per team / user / model / provider, without Grafana.

Two sources of the same numbers:

- ``--prometheus URL``: the sidecar's counters in a Prometheus server (HTTP API):
  ``ai_cost_usd_total``, ``ai_prompt_tokens_total``, ``ai_completion_tokens_total`` (labels
  ``llm``, ``model`` and the custom labels) and ``ai_requests_total`` (calls). The increase over
  the window is computed from the samples themselves, per series: a restarted sidecar (any of its
  counters dropped) is followed, and a series born inside the window counts from zero. Unlike PromQL's
  ``increase()`` nothing is extrapolated, so the totals equal the access log's for the same calls.
- ``--access-log FILE...``: Envoy's JSON access-log lines (the reference format in
  envoy/envoy.yaml; ``.gz`` files are read too). A line is an LLM call when its ``operation`` is
  set and not ``unknown``; ``cost_usd`` is absent on unpriced calls (counted, at $0).

``--by`` names labels (Prometheus) or fields (access log): ``llm`` (the access log's
``provider``), ``model`` (the request model, else the response model), and any custom label such
as ``team`` or ``user``.

Its inputs carry client-chosen text (model names, team headers) and may come from a server or a
file nobody vetted, so the report is bounded and cannot be turned against its reader: one deadline
for the whole Prometheus exchange, a cap on its answers, on a log line, on decompression and on the
groups held; values outside a counter's range refused; control characters escaped visibly before
they reach a terminal and CSV cells that a spreadsheet would run as a formula neutralised
(docs/security.md, "extproc spend").
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import IO, Any
from zlib import error as zlib_error

COST = "ai_cost_usd_total"
PROMPT = "ai_prompt_tokens_total"
COMPLETION = "ai_completion_tokens_total"
CALLS = "ai_requests_total"
METRICS = (("cost", COST), ("input", PROMPT), ("output", COMPLETION), ("calls", CALLS))
# --by name -> access-log field(s), first non-empty wins
LOG_FIELDS: dict[str, tuple[str, ...]] = {"llm": ("provider",), "model": ("model", "provider_model")}
DEFAULT_RANGE = "7d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_POINTS = 2000  # samples per series fetched from Prometheus (the step grows with the window)
DEFAULT_TIMEOUT = 30.0  # seconds for the whole Prometheus exchange (--timeout)
DEFAULT_MAX_ANSWER_MB = 64  # one Prometheus answer (--max-answer-mb)
MAX_LINE_BYTES = 1 << 20  # an access-log line; longer ones are skipped without being held
MAX_GZIP_RATIO = 200  # a .gz file may decompress to this many times its size (floor: _GZIP_FLOOR)
_GZIP_FLOOR = 64 << 20
MAX_GROUPS = 100_000  # distinct --by keys held in memory
MAX_VALUE = 1e15  # a count, token total or USD amount above this is not a counter value
MAX_LABEL_CHARS = 128  # a --by value is cut to this (as the sidecar cuts labels)
_MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
_CHUNK = 1 << 16


class SpendError(Exception):
    """A source we cannot read: one line for stderr."""


# ---- what may reach a terminal or a spreadsheet -------------------------------------------------
# C0 controls, DEL, C1 controls (CSI, OSC...) and the bidirectional overrides: each can move the
# cursor, retitle or clear the terminal, write the clipboard (OSC 52) or reorder what is shown.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def visible(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``)."""
    return _CONTROL.sub(_escape_char, text)


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: a leading ``= + - @`` tab or CR gets a ``'``
    (OWASP's CSV-injection rule), and control characters are escaped."""
    if text.startswith(_FORMULA_START):
        text = "'" + text
    return visible(text)


@dataclass(slots=True)
class Row:
    calls: float = 0
    input: float = 0
    output: float = 0
    cost: float = 0


@dataclass(slots=True)
class Report:
    by: list[str]
    since: float
    until: float
    rows: dict[tuple[str, ...], Row] = field(default_factory=dict)

    def row(self, key: tuple[str, ...]) -> Row:
        r = self.rows.get(key)
        if r is None:
            if len(self.rows) >= MAX_GROUPS:
                raise SpendError(f"more than {MAX_GROUPS:,} distinct groups: group --by fewer labels or a shorter window")
            r = self.rows[key] = Row()
        return r

    def sorted(self) -> list[tuple[tuple[str, ...], Row]]:
        return sorted(self.rows.items(), key=lambda kv: (-kv[1].cost, -kv[1].calls, kv[0]))

    def total(self) -> Row:
        t = Row()
        for r in self.rows.values():
            t.calls += r.calls
            t.input += r.input
            t.output += r.output
            t.cost += r.cost
        return t


# ---- time arguments ---------------------------------------------------------------------------
def duration(text: str) -> float:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` -> seconds."""
    m = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,9})?)\s*([smhdw])\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {visible(text)!r} (e.g. 30m, 24h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def timestamp(text: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        t = float(text)
    except ValueError:
        try:
            dt = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a time: {visible(text)!r} (ISO 8601, e.g. 2026-11-23 or 2026-11-23T09:00:00Z, or unix seconds)"
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        t = dt.timestamp()
    if not 0 <= t <= _MAX_TIME:  # also NaN and inf
        raise argparse.ArgumentTypeError(f"not a time between 1970 and 9999: {visible(text)!r}")
    return t


def window(args: argparse.Namespace, now: float | None = None) -> tuple[float, float]:
    until = args.until if args.until is not None else (now if now is not None else time.time())
    if args.since is not None:
        since = args.since
    else:
        since = until - (args.range if args.range is not None else duration(DEFAULT_RANGE))
    if since >= until:
        raise SpendError("the window is empty: --since must be before --until")
    if since < 0:
        raise SpendError("the window starts before 1970: use a shorter --range")
    return since, until


# ---- access logs ------------------------------------------------------------------------------
class _Capped(io.RawIOBase):
    """A decompressed stream that refuses to grow past ``limit`` bytes (a decompression bomb)."""

    def __init__(self, inner: IO[bytes], limit: int, path: str) -> None:
        self.inner, self.left, self.path = inner, limit, path

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.inner.readinto(b)  # type: ignore[attr-defined]
        self.left -= n
        if self.left < 0:
            raise SpendError(
                f"cannot read {visible(self.path)}: it decompresses to more than {MAX_GZIP_RATIO} times its size (not an access log)"
            )
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


def _open(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    if path.endswith(".gz"):
        limit = max(_GZIP_FLOOR, MAX_GZIP_RATIO * os.path.getsize(path))
        return io.BufferedReader(_Capped(gzip.open(path, "rb"), limit, path), _CHUNK)  # type: ignore[arg-type]
    return open(path, "rb")


def _read_lines(f: IO[bytes]) -> Iterator[bytes | None]:
    """The lines of ``f``; a line longer than :data:`MAX_LINE_BYTES` is read past in slices and
    comes out as ``None`` (never held whole)."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES:
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            yield None
            continue
        yield line


def _lines(paths: Iterable[str]) -> Iterator[tuple[str, bytes | None]]:
    for path in paths:
        try:
            f = _open(path)
            with f:
                for line in _read_lines(f):
                    yield path, line
        except (OSError, EOFError, gzip.BadGzipFile, zlib_error) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise SpendError(f"cannot read {visible(path)}: {visible(reason)}") from None


class _OutOfRange(ValueError):
    pass


def _number(v: Any) -> float:
    """A count or USD amount from a log field: absent/``null``/not a number -> 0; negative,
    non-finite or above :data:`MAX_VALUE` -> :class:`_OutOfRange` (the line is not an entry)."""
    if isinstance(v, bool) or v is None:
        return 0.0
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return 0.0
    if not isinstance(v, int | float):
        return 0.0
    if not 0 <= v <= MAX_VALUE:  # NaN fails too
        raise _OutOfRange(v)
    return float(v)


def _text(v: Any) -> str:
    if v is None or v == "-":
        return ""
    v = v if isinstance(v, str) else str(v)
    return v if len(v) <= MAX_LABEL_CHARS else v[:MAX_LABEL_CHARS]


def _log_time(v: Any) -> float | None:
    if not isinstance(v, str) or not v or len(v) > 64:
        return None
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def from_access_logs(paths: list[str], by: list[str], since: float, until: float) -> tuple[Report, int]:
    """The report, and how many non-empty lines were not access-log entries (skipped): not JSON
    (or nested too deep to parse), longer than :data:`MAX_LINE_BYTES`, or with a number out of
    range."""
    report = Report(by, since, until)
    skipped = 0
    for _, raw in _lines(paths):
        if raw is None:
            skipped += 1
            continue
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            skipped += 1
            continue
        if not isinstance(entry, dict):
            skipped += 1
            continue
        op = entry.get("operation")
        if not op or op == "unknown" or op == "-":
            continue  # not an LLM call (or no response ever came)
        t = _log_time(entry.get("system_time"))
        if t is None or not since < t <= until:
            continue
        try:
            counts = (_number(entry.get("prompt_tokens")), _number(entry.get("completion_tokens")), _number(entry.get("cost_usd")))
        except _OutOfRange:
            skipped += 1
            continue
        key = tuple(_log_value(entry, name) for name in by)
        r = report.row(key)
        r.calls += 1
        r.input += counts[0]
        r.output += counts[1]
        r.cost += counts[2]
    return report, skipped


def _log_value(entry: dict[str, Any], name: str) -> str:
    for key in LOG_FIELDS.get(name, (name,)):
        v = _text(entry.get(key))
        if v:
            return v
    return "unknown" if name == "model" else ""


# ---- Prometheus -------------------------------------------------------------------------------
class Prometheus:
    """The HTTP API, read within one deadline for every query together and a size cap per answer:
    a server that drips its answer or sends without end cannot hold the report or its memory."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, max_answer_bytes: int = DEFAULT_MAX_ANSWER_MB << 20) -> None:
        if not re.match(r"^https?://", url):
            url = "http://" + url
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.max_answer_bytes = max_answer_bytes
        parts = urllib.parse.urlsplit(self.url)
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise SpendError(f"not a Prometheus URL: {visible(self.url)}") from None
        if not parts.hostname:
            raise SpendError(f"not a Prometheus URL: {visible(self.url)}")
        self._parts = parts
        self.shown = visible(self.url)

    def _timed_out(self) -> SpendError:
        return SpendError(f"Prometheus at {self.shown} did not answer within {self.timeout:g} s (--timeout)")

    def get(self, path: str, params: dict[str, str]) -> Any:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out()
        parts = self._parts
        conn_type = HTTPSConnection if parts.scheme == "https" else HTTPConnection
        conn = conn_type(parts.hostname or "", parts.port, timeout=left)
        expired = threading.Event()

        def cut() -> None:  # the deadline: end the exchange however slowly the server sends
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(left, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", f"{parts.path}{path}?{urllib.parse.urlencode(params)}", headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = self._read(resp)
        except SpendError:
            raise
        except (OSError, HTTPException) as e:
            if expired.is_set():
                raise self._timed_out() from None
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise SpendError(f"cannot reach Prometheus at {self.shown}: {visible(reason)}") from None
        finally:
            watchdog.cancel()
            conn.close()
        if expired.is_set():
            raise self._timed_out()
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            answer = None
        if resp.status != 200:
            detail = answer.get("error") if isinstance(answer, dict) else None
            detail = visible(detail[:200]) if isinstance(detail, str) else ""
            raise SpendError(f"Prometheus at {self.shown} answered HTTP {resp.status}{': ' + detail if detail else ''}")
        if answer is None:
            raise SpendError(f"{self.shown} did not answer with Prometheus API JSON")
        if not isinstance(answer, dict) or answer.get("status") != "success" or not isinstance(answer.get("data"), dict):
            error = answer.get("error") if isinstance(answer, dict) else None
            why = visible(error[:200]) if isinstance(error, str) else "not a Prometheus API answer"
            raise SpendError(f"Prometheus at {self.shown}: {why}")
        return answer["data"]

    def _read(self, resp: Any) -> bytearray:
        """The whole answer, refused as soon as it passes the cap (never held past it)."""
        cap = self.max_answer_bytes
        length = resp.getheader("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise self._too_large()
        body = bytearray()
        while True:
            chunk = resp.read1(_CHUNK)
            if not chunk:
                return body
            body += chunk
            if len(body) > cap:
                raise self._too_large()

    def _too_large(self) -> SpendError:
        return SpendError(
            f"Prometheus at {self.shown} sent an answer larger than {self.max_answer_bytes >> 20} MiB "
            "(--max-answer-mb; or a shorter window)"
        )

    def series_values(self, metric: str, since: float, until: float) -> dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]:
        """Every series of ``metric``: its samples at regular steps over [since, until], plus its
        value at ``until``."""
        step = max(1.0, math.ceil((until - since) / _MAX_POINTS))
        out: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        data = self.get("/api/v1/query_range", {"query": metric, "start": f"{since:.3f}", "end": f"{until:.3f}", "step": f"{step:g}"})
        for s in self._result(data, metric):
            values = s.get("values")
            if not isinstance(values, list):
                raise self._bad(metric, "a series without values")
            out[self._series_labels(s, metric)] = [self._sample(p, metric) for p in values]
        data = self.get("/api/v1/query", {"query": metric, "time": f"{until:.3f}"})
        for s in self._result(data, metric):
            t, v = self._sample(s.get("value"), metric)
            points = out.setdefault(self._series_labels(s, metric), [])
            if not points or points[-1][0] < t:
                points.append((t, v))
        return out

    def _bad(self, metric: str, why: str) -> SpendError:
        return SpendError(f"Prometheus at {self.shown} answered {metric} with {why}")

    def _result(self, data: dict[str, Any], metric: str) -> list[dict[str, Any]]:
        result = data.get("result")
        if not isinstance(result, list) or not all(isinstance(s, dict) for s in result):
            raise self._bad(metric, "no list of series")
        return result

    def _series_labels(self, series: dict[str, Any], metric: str) -> tuple[tuple[str, str], ...]:
        labels = series.get("metric", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise self._bad(metric, "labels that are not strings")
        return _labels(series)

    def _sample(self, point: Any, metric: str) -> tuple[float, float]:
        """``[time, "value"]``, a counter's value: finite, not negative, at most :data:`MAX_VALUE`."""
        if not isinstance(point, list) or len(point) != 2:
            raise self._bad(metric, "a sample that is not [time, value]")
        t, v = point
        try:
            if isinstance(t, bool) or isinstance(v, bool):
                raise TypeError
            t, v = float(t), float(v)
        except (TypeError, ValueError):
            raise self._bad(metric, "a sample that is not a number") from None
        if not (0 <= t <= _MAX_TIME and 0 <= v <= MAX_VALUE):
            raise self._bad(metric, f"a value a counter cannot have ({v!r} at {t!r})")
        return t, v


def _labels(series: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, _text(v)) for k, v in series.get("metric", {}).items() if k != "__name__"))


def counter_increase(points: list[tuple[float, float]], since: float, restarts: Iterable[float] = ()) -> float:
    """How much a counter grew over the window from its samples: from its value at ``since`` (0 if
    the series did not exist yet), following restarts: a drop, or a restart of its target seen in
    another series (``restarts``: sample times), means it started again from 0."""
    if not points:
        return 0.0
    restarts = sorted(restarts)
    first_t, prev = points[0]
    total = 0.0 if first_t <= since else prev  # born inside the window: counts from 0
    prev_t = first_t
    for t, v in points[1:]:
        restarted = v < prev or any(prev_t < r <= t for r in restarts)
        total += v if restarted else v - prev
        prev, prev_t = v, t
    return total


def _target(labels: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    d = dict(labels)
    return d.get("job", ""), d.get("instance", "")


def from_prometheus(
    url: str,
    by: list[str],
    since: float,
    until: float,
    timeout: float = DEFAULT_TIMEOUT,
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_MB << 20,
) -> Report:
    prom = Prometheus(url, timeout, max_answer_bytes)
    report = Report(by, since, until)
    fetched = [(attr, prom.series_values(metric, since, until)) for attr, metric in METRICS]
    # A counter that dropped means its process restarted: every counter of that scrape target did.
    restarts: dict[tuple[str, str], set[float]] = {}
    for _, series in fetched:
        for labels, points in series.items():
            drops = {t for (_, a), (t, b) in zip(points, points[1:]) if b < a}
            if drops:
                restarts.setdefault(_target(labels), set()).update(drops)
    for attr, series in fetched:
        for labels, points in series.items():
            grew = counter_increase(points, since, restarts.get(_target(labels), ()))
            if grew == 0:
                continue
            d = dict(labels)
            key = tuple(d.get(name, "") for name in by)
            r = report.row(key)
            setattr(r, attr, getattr(r, attr) + grew)
    return report


# ---- output -----------------------------------------------------------------------------------
COLUMNS = ("calls", "input_tokens", "output_tokens", "cost_usd", "share")


def _records(report: Report) -> list[dict[str, Any]]:
    total = report.total().cost
    out = []
    for key, r in report.sorted():
        rec: dict[str, Any] = dict(zip(report.by, key))
        rec.update(
            calls=round(r.calls),
            input_tokens=round(r.input),
            output_tokens=round(r.output),
            cost_usd=r.cost,
            share=(r.cost / total) if total > 0 else None,
        )
        out.append(rec)
    return out


def render(report: Report, fmt: str) -> str:
    records = _records(report)
    t = report.total()
    if fmt == "json":
        return (
            json.dumps(
                {
                    "since": _iso(report.since),
                    "until": _iso(report.until),
                    "by": report.by,
                    "rows": records,
                    "total": {
                        "calls": round(t.calls),
                        "input_tokens": round(t.input),
                        "output_tokens": round(t.output),
                        "cost_usd": t.cost,
                    },
                },
                indent=2,
            )
            + "\n"
        )
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*(csv_cell(b) for b in report.by), *COLUMNS])
        for rec in records:
            w.writerow(
                [
                    *(csv_cell(rec[b]) for b in report.by),
                    rec["calls"],
                    rec["input_tokens"],
                    rec["output_tokens"],
                    repr(rec["cost_usd"]),
                    "" if rec["share"] is None else f"{rec['share']:.6f}",
                ]
            )
        return buf.getvalue()
    header = [*(visible(b.upper()) for b in report.by), "CALLS", "TOKENS IN", "TOKENS OUT", "USD", "SHARE"]
    rows = [
        [
            *(visible(rec[b]) or "(none)" for b in report.by),
            f"{rec['calls']:,}",
            f"{rec['input_tokens']:,}",
            f"{rec['output_tokens']:,}",
            _usd(rec["cost_usd"]),
            "-" if rec["share"] is None else f"{rec['share'] * 100:.1f}%",
        ]
        for rec in records
    ]
    rows.append(
        [
            *(["TOTAL"] + [""] * (len(report.by) - 1)),
            f"{round(t.calls):,}",
            f"{round(t.input):,}",
            f"{round(t.output):,}",
            _usd(t.cost),
            "100.0%" if t.cost > 0 else "-",
        ]
    )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    nlab = len(report.by)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < nlab else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"LLM spend {_iso(report.since)} .. {_iso(report.until)}", "", line(header)]
    out += [line(r) for r in rows[:-1]]
    out += ["  ".join("-" * w for w in widths), line(rows[-1])]
    return "\n".join(out) + "\n"


def _usd(v: float) -> str:
    if v >= 100:
        return f"${v:,.2f}"
    return f"${v:.6f}" if 0 < v < 0.0001 else f"${v:,.4f}"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---- command line -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", metavar="URL", help="Prometheus server scraping the sidecar (e.g. http://prometheus:9090)")
    src.add_argument("--access-log", metavar="FILE", nargs="+", help="Envoy JSON access-log files (.gz too; - for stdin)")
    p.add_argument(
        "--by",
        nargs="+",
        default=["model"],
        metavar="LABEL",
        help="group by these labels/fields: team, user, model, llm, ... (default: model; commas work too)",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument("--range", type=duration, help=f"the window ending at --until (e.g. 24h, 7d; default {DEFAULT_RANGE})")
    when.add_argument("--since", type=timestamp, help="window start (ISO 8601 or unix seconds)")
    p.add_argument("--until", type=timestamp, help="window end (default: now)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline for the whole Prometheus exchange, every query together (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-answer-mb",
        type=_positive,
        default=DEFAULT_MAX_ANSWER_MB,
        metavar="MB",
        help=f"largest Prometheus answer read, per query (default {DEFAULT_MAX_ANSWER_MB})",
    )


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v <= 1e6:
        raise argparse.ArgumentTypeError(f"not a number between 0 and 1,000,000: {visible(text)!r}")
    return v


def run(args: argparse.Namespace) -> int:
    by = [b for item in args.by for b in item.split(",") if b]
    try:
        since, until = window(args)
        if args.prometheus:
            report = from_prometheus(args.prometheus, by, since, until, args.timeout, int(args.max_answer_mb * (1 << 20)))
        else:
            report, skipped = from_access_logs(args.access_log, by, since, until)
            if skipped:
                print(f"extproc spend: skipped {skipped} line(s) that are not JSON access-log entries", file=sys.stderr)
    except SpendError as e:
        print(f"extproc spend: {visible(str(e))}", file=sys.stderr)
        return 1
    sys.stdout.write(render(report, args.format))
    return 0
