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
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

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


class SpendError(Exception):
    """A source we cannot read: one line for stderr."""


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
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 24h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def timestamp(text: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (ISO 8601, e.g. 2026-11-23 or 2026-11-23T09:00:00Z, or unix seconds)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def window(args: argparse.Namespace, now: float | None = None) -> tuple[float, float]:
    until = args.until if args.until is not None else (now if now is not None else time.time())
    if args.since is not None:
        since = args.since
    else:
        since = until - (args.range if args.range is not None else duration(DEFAULT_RANGE))
    if since >= until:
        raise SpendError("the window is empty: --since must be before --until")
    return since, until


# ---- access logs ------------------------------------------------------------------------------
def _open(path: str) -> IO[str]:
    if path == "-":
        return sys.stdin
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _lines(paths: Iterable[str]) -> Iterator[tuple[str, str]]:
    for path in paths:
        try:
            f = _open(path)
            with f:
                for line in f:
                    yield path, line
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise SpendError(f"cannot read {path}: {reason}") from None


def _number(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        return 0.0
    if isinstance(v, int | float):
        return float(v) if math.isfinite(v) else 0.0
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return 0.0
        return f if math.isfinite(f) else 0.0
    return 0.0


def _text(v: Any) -> str:
    if v is None or v == "-":
        return ""
    return v if isinstance(v, str) else str(v)


def _log_time(v: Any) -> float | None:
    if not isinstance(v, str) or not v:
        return None
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def from_access_logs(paths: list[str], by: list[str], since: float, until: float) -> tuple[Report, int]:
    """The report, and how many non-empty lines were not access-log JSON (skipped)."""
    report = Report(by, since, until)
    skipped = 0
    for _, line in _lines(paths):
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
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
        key = tuple(_log_value(entry, name) for name in by)
        r = report.row(key)
        r.calls += 1
        r.input += _number(entry.get("prompt_tokens"))
        r.output += _number(entry.get("completion_tokens"))
        r.cost += _number(entry.get("cost_usd"))
    return report, skipped


def _log_value(entry: dict[str, Any], name: str) -> str:
    for key in LOG_FIELDS.get(name, (name,)):
        v = _text(entry.get(key))
        if v:
            return v
    return "unknown" if name == "model" else ""


# ---- Prometheus -------------------------------------------------------------------------------
class Prometheus:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        if not re.match(r"^https?://", url):
            url = "http://" + url
        self.url = url.rstrip("/")
        self.timeout = timeout

    def get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                detail = json.load(e).get("error", "")
            except Exception:
                pass
            raise SpendError(f"Prometheus at {self.url} answered HTTP {e.code}{': ' + detail if detail else ''}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SpendError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        except ValueError:
            raise SpendError(f"{self.url} did not answer with Prometheus API JSON") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            raise SpendError(f"Prometheus at {self.url}: {body.get('error') if isinstance(body, dict) else 'bad answer'}")
        return body["data"]

    def series_values(self, metric: str, since: float, until: float) -> dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]:
        """Every series of ``metric``: its samples at regular steps over [since, until], plus its
        value at ``until``."""
        step = max(1.0, math.ceil((until - since) / _MAX_POINTS))
        out: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        data = self.get("/api/v1/query_range", {"query": metric, "start": f"{since:.3f}", "end": f"{until:.3f}", "step": f"{step:g}"})
        for s in data.get("result", []):
            out[_labels(s)] = [(float(t), float(v)) for t, v in s.get("values", [])]
        data = self.get("/api/v1/query", {"query": metric, "time": f"{until:.3f}"})
        for s in data.get("result", []):
            t, v = s["value"]
            points = out.setdefault(_labels(s), [])
            if not points or points[-1][0] < float(t):
                points.append((float(t), float(v)))
        return out


def _labels(series: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in series.get("metric", {}).items() if k != "__name__"))


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


def from_prometheus(url: str, by: list[str], since: float, until: float) -> Report:
    prom = Prometheus(url)
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
        rec.update(calls=round(r.calls), input_tokens=round(r.input), output_tokens=round(r.output),
                   cost_usd=r.cost, share=(r.cost / total) if total > 0 else None)
        out.append(rec)
    return out


def render(report: Report, fmt: str) -> str:
    records = _records(report)
    t = report.total()
    if fmt == "json":
        return json.dumps({
            "since": _iso(report.since), "until": _iso(report.until), "by": report.by, "rows": records,
            "total": {"calls": round(t.calls), "input_tokens": round(t.input), "output_tokens": round(t.output), "cost_usd": t.cost},
        }, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*report.by, *COLUMNS])
        for rec in records:
            w.writerow([*(rec[b] for b in report.by), rec["calls"], rec["input_tokens"], rec["output_tokens"],
                        repr(rec["cost_usd"]), "" if rec["share"] is None else f"{rec['share']:.6f}"])
        return buf.getvalue()
    header = [*(b.upper() for b in report.by), "CALLS", "TOKENS IN", "TOKENS OUT", "USD", "SHARE"]
    rows = [[*(rec[b] or "(none)" for b in report.by), f"{rec['calls']:,}", f"{rec['input_tokens']:,}",
             f"{rec['output_tokens']:,}", _usd(rec["cost_usd"]),
             "-" if rec["share"] is None else f"{rec['share'] * 100:.1f}%"] for rec in records]
    rows.append([*(["TOTAL"] + [""] * (len(report.by) - 1)), f"{round(t.calls):,}", f"{round(t.input):,}",
                 f"{round(t.output):,}", _usd(t.cost), "100.0%" if t.cost > 0 else "-"])
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
    p.add_argument("--by", nargs="+", default=["model"], metavar="LABEL",
                   help="group by these labels/fields: team, user, model, llm, ... (default: model; commas work too)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--range", type=duration, help=f"the window ending at --until (e.g. 24h, 7d; default {DEFAULT_RANGE})")
    when.add_argument("--since", type=timestamp, help="window start (ISO 8601 or unix seconds)")
    p.add_argument("--until", type=timestamp, help="window end (default: now)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def run(args: argparse.Namespace) -> int:
    by = [b for item in args.by for b in item.split(",") if b]
    try:
        since, until = window(args)
        if args.prometheus:
            report = from_prometheus(args.prometheus, by, since, until)
        else:
            report, skipped = from_access_logs(args.access_log, by, since, until)
            if skipped:
                print(f"extproc spend: skipped {skipped} line(s) that are not JSON access-log entries", file=sys.stderr)
    except SpendError as e:
        print(f"extproc spend: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(render(report, args.format))
    return 0
