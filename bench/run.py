"""`make bench` / `python -m bench`: Envoy alone vs Envoy + sidecar (inline, observability-only, and
inline with tracing on and its collector down), and the LiteLLM proxy when asked, side by side in one
run, on 127.0.0.1.

All stacks run at once against the same fast upstreams; every scenario is run against each stack
back to back, so the ratios compare measurements taken within seconds of each other on a shared,
noisy machine. Results: ``bench/results/<timestamp>.json`` and ``.md`` (+ ``latest.*``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench import litellm, load
from bench.procstat import cpu_seconds, process_rss, tree
from bench.sidecar import read_counts
from bench.upstream import CHAT_REQUEST, MODEL, PROMPT_TOKENS, STREAM_REQUEST, direct_response_envoy
from extproc.devtools import envoy_config
from extproc.devtools.dev import envoy_binary, envoy_command, free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CHAT_PATH = "/v1/chat/completions"
SSE_PATH = "/sse/v1/chat/completions"
DEFAULT_STACKS = "envoy,inline,fewer,observe,traced,traced-live"


@dataclass
class Profile:
    concurrency: tuple[int, ...] = (1, 16, 64)
    rates: tuple[int, ...] = (500, 1500)
    throughput_s: float = 5.0
    rate_s: float = 6.0
    stream_rate: int = 50  # streams/s
    stream_s: float = 6.0
    chunks: int = 50
    chunk_interval_ms: float = 2.0
    hold_streams: int = 1000
    warmup_s: float = 1.0
    # With the litellm stack: one more fixed rate, first, that LiteLLM keeps up with (every stack runs it),
    # no LiteLLM run above litellm_max_rate (it would queue for minutes and load the machine for the
    # stacks measured after it), and streams at a rate it keeps up with (every stack)
    litellm_rate: int = 20
    litellm_max_rate: int = 100
    litellm_stream_rate: int = 5


QUICK = Profile(
    concurrency=(1, 16, 64),
    rates=(100, 200),
    throughput_s=1.0,
    rate_s=1.0,
    stream_rate=10,
    stream_s=1.0,
    chunks=50,
    chunk_interval_ms=1.0,
    hold_streams=20,
    warmup_s=0.3,
    litellm_rate=10,
)


# ---- processes ---------------------------------------------------------------------------------
def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    return {p: cpu_seconds([p]) for p in pids}


def rss_mb(pid: int) -> float:
    return process_rss(pid) / 2**20


class RssPeak:
    """The largest RSS any of ``pids`` reached while the block ran (sampled every 50 ms)."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids, self.interval = pids, interval
        self.max_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for p in self.pids:
                try:
                    mb = rss_mb(p)
                except OSError:  # a worker that exited
                    continue
                self.max_mb = mb if self.max_mb is None else max(self.max_mb, mb)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssPeak:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.pids:
            self._thread.join()


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _is_worker(pid: int) -> bool:
    """A LiteLLM (uvicorn) worker, not multiprocessing's resource tracker."""
    try:
        return b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class Stack:
    name: str  # envoy | inline | fewer (fewer-messages mode, HTTP/2 upstream) | observe | observe-fewer | traced (inline, tracing,
    # collector down) | traced-live (collector up) | litellm (the LiteLLM proxy alone, no Envoy)
    workdir: Path
    upstreams: list[envoy_config.Upstream]
    workers: int
    envoy_concurrency: int
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    admin: int = 0
    sidecar: subprocess.Popen | None = None
    envoy: subprocess.Popen | None = None
    counts: Path | None = None
    collector: subprocess.Popen | None = None
    litellm: subprocess.Popen | None = None

    @property
    def has_sidecar(self) -> bool:
        return self.name not in ("envoy", "litellm")

    @property
    def is_litellm(self) -> bool:
        return self.name == "litellm"

    # What the clients send: LiteLLM serves one path and picks the deployment by the body's model.
    @property
    def chat_path(self) -> str:
        return CHAT_PATH

    @property
    def sse_path(self) -> str:
        return CHAT_PATH if self.is_litellm else SSE_PATH

    @property
    def stream_body(self) -> bytes:
        if not self.is_litellm:
            return STREAM_REQUEST
        return orjson.dumps({**orjson.loads(STREAM_REQUEST), "model": litellm.SSE_MODEL})

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {litellm.MASTER_KEY}"} if self.is_litellm else {}

    def start(self, wait: bool = True) -> None:
        d = self.workdir / self.name
        d.mkdir(parents=True)
        self.port, self.admin = free_port(), free_port()
        if self.is_litellm:
            self._start_litellm(d, wait)
            return
        extproc = None
        if self.has_sidecar:
            sport = free_port()
            extproc = f"127.0.0.1:{sport}"
            cfg = d / "sidecar.yaml"
            sidecar_cfg: dict[str, Any] = {"listen": extproc, "stats": {"port": 0}, "logging": {"level": "warning"}}
            if self.name.startswith("traced"):  # "traced": OTLP export to a port nobody listens on
                collector = free_port()
                sidecar_cfg["tracing"] = {"otlpEndpoint": f"127.0.0.1:{collector}"}
                if self.name == "traced-live":
                    self.collector = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", str(collector)], cwd=ROOT)
                    wait_port(collector, proc=self.collector)
            cfg.write_text(yaml.safe_dump(sidecar_cfg))
            self.counts = d / "counts"
            self.counts.mkdir()
            self.sidecar = subprocess.Popen(
                [sys.executable, "-m", "bench.sidecar", "--config", str(cfg), "--workers", str(self.workers), "--counts", str(self.counts)],
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=subprocess.DEVNULL,
                stderr=(d / "sidecar.log").open("wb"),
            )
            wait_port(sport, proc=self.sidecar)
        upstreams = self.upstreams
        fewer = self.name in ("fewer", "observe-fewer")
        if fewer:  # HTTP/2 to the (Envoy) non-streaming upstream: 2 messages per call
            upstreams = [envoy_config.Upstream(u.prefix, u.url, u.provider, http2=not u.prefix.startswith("/sse/")) for u in upstreams]
        boot = envoy_config.bootstrap(
            upstreams=upstreams,
            listen=f"127.0.0.1:{self.port}",
            extproc=extproc,
            access_log=str(d / "access.log"),
            admin=f"127.0.0.1:{self.admin}",
            observability_mode=self.name.startswith("observe"),
            fewer_messages=fewer,
        )
        (d / "envoy.yaml").write_text(envoy_config.dump(boot))
        self.envoy = subprocess.Popen(
            envoy_command(d / "envoy.yaml", "--concurrency", str(self.envoy_concurrency)),
            stdout=subprocess.DEVNULL,
            stderr=(d / "envoy.log").open("wb"),
        )
        wait_port(self.port, proc=self.envoy)

    def _start_litellm(self, d: Path, wait: bool) -> None:
        """LiteLLM's proxy on the same upstreams, as many workers as a sidecar gets; no Envoy in front."""
        by_prefix = {u.prefix: u.url for u in self.upstreams}
        cfg = litellm.config(f"{by_prefix['/']}/v1", f"{by_prefix['/sse/']}/sse/v1", MODEL)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (d / "prometheus").mkdir()
        env = {**os.environ, **litellm.ENV, "PROMETHEUS_MULTIPROC_DIR": str(d / "prometheus"), **self.env}
        self.litellm = subprocess.Popen(
            litellm.command(d / "config.yaml", self.port, self.workers),
            cwd=d,
            env=env,
            stdout=(d / "litellm.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 300.0) -> None:
        """LiteLLM's uvicorn parent listens before its workers have imported LiteLLM (tens of seconds):
        wait until every worker has loaded the config, then for one answered call."""
        if not self.is_litellm:
            return
        assert self.litellm is not None
        log = self.workdir / self.name / "litellm.log"
        deadline = time.monotonic() + timeout
        while log.read_bytes().count(b"Proxy initialized with Config") < self.workers:
            if self.litellm.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"LiteLLM did not start (exit {self.litellm.poll()}); see {log}")
            time.sleep(0.5)
        wait_port(self.port, timeout=max(1.0, deadline - time.monotonic()), proc=self.litellm)
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{CHAT_PATH}",
            data=CHAT_REQUEST,
            method="POST",
            headers={"content-type": "application/json", **self.headers},
        )
        while True:
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                return
            except OSError:
                if self.litellm.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        for p in (self.envoy, self.sidecar, self.collector, self.litellm):
            if p is not None and p.poll() is None:
                pids = tree(p.pid)
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    for pid in pids:  # LiteLLM's workers too
                        try:
                            os.kill(pid, 9)
                        except OSError:
                            pass
                    p.wait()

    def sidecar_pids(self) -> list[int]:
        return tree(self.sidecar.pid) if self.sidecar else []

    def litellm_pids(self) -> list[int]:
        return tree(self.litellm.pid) if self.litellm else []

    def worker_pids(self) -> list[int]:
        if self.is_litellm:
            return [p for p in self.litellm_pids()[1:] if _is_worker(p)]
        pids = self.sidecar_pids()
        return pids[1:] if len(pids) > 1 else pids

    def _cpu(self) -> dict[str, Any]:
        return {
            "sidecar_cpu": None if self.is_litellm else cpu_seconds(self.sidecar_pids()),
            "worker_cpu": cpu_by_pid(self.worker_pids()),
            "envoy_cpu": cpu_seconds([self.envoy.pid]) if self.envoy else None if self.is_litellm else 0.0,
            "litellm_cpu": cpu_seconds(self.litellm_pids()) if self.is_litellm else None,  # the whole process tree
        }

    def snapshot(self) -> dict[str, Any]:
        cpu = self._cpu()
        snap: dict[str, Any] = {**cpu, "end": cpu}
        if self.is_litellm:  # its Prometheus counters; the scrape's own CPU is left out of the deltas
            tokens = self.litellm_prompt_tokens()
            snap["counts"] = {"observed": tokens / PROMPT_TOKENS, "prompt_tokens": tokens}
            snap["end"] = self._cpu()
        else:
            snap["counts"] = read_counts(self.counts) if self.counts else {}
        # ext_proc messages Envoy sent to / received from the sidecar (its own counters)
        snap["msgs"] = {k.rpartition(".")[2]: v for k, v in self.envoy_stats("ext_proc.stream_msgs").items()} if self.has_sidecar else {}
        snap["t"] = time.monotonic()
        return snap

    def litellm_prompt_tokens(self) -> float:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics/", headers=self.headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            return litellm.prompt_tokens(r.read().decode())

    def envoy_stats(self, prefix: str = "ext_proc") -> dict[str, int]:
        out = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?filter={prefix}", timeout=5) as r:
            for line in r.read().decode().splitlines():
                k, _, v = line.partition(": ")
                if v.isdigit():
                    out[k] = int(v)
        return out


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before; CPU from the end of ``before`` (after any scrape it made) to the start of ``after``."""
    start = before.get("end", before)
    per_worker = {pid: after["worker_cpu"].get(pid, 0) - start["worker_cpu"].get(pid, 0) for pid in after["worker_cpu"]}
    sidecar, envoy = _sub(after["sidecar_cpu"], start["sidecar_cpu"]), _sub(after["envoy_cpu"], start["envoy_cpu"])
    llm = _sub(after.get("litellm_cpu"), start.get("litellm_cpu"))
    return {
        "sidecar_cpu_s": sidecar,
        "envoy_cpu_s": envoy,
        "litellm_cpu_s": llm,
        # what the proxy costs: Envoy + sidecar, or LiteLLM's processes
        "proxy_cpu_s": llm if llm is not None else (envoy or 0.0) + (sidecar or 0.0),
        "worker_cpu_s": sorted(per_worker.values(), reverse=True),
        "counts": {k: after["counts"].get(k, 0) - before["counts"].get(k, 0) for k in after["counts"]},
        "msgs": {k: after["msgs"].get(k, 0) - before["msgs"].get(k, 0) for k in after["msgs"]},
        "wall_s": after["t"] - before["t"],
    }


# ---- load --------------------------------------------------------------------------------------
def wrk_script(path: Path, body: bytes, headers: dict[str, str] | None = None) -> Path:
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body.decode()}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        + "done = function(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        '  io.write(string.format("JSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"errors\\":%d,\\"non2xx\\":%d,'
        '\\"p50_us\\":%d,\\"p99_us\\":%d}\\n", summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,'
        " e.status, latency:percentile(50), latency:percentile(99)))\n"
        "end\n"
    )
    return path


def wrk(port: int, script: Path, connections: int, seconds: float) -> dict[str, Any]:
    # --timeout: wrk's 2 s default would count LiteLLM's queued calls at c=64 as errors, not as latency
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{CHAT_PATH}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in p.stdout.splitlines():
        if line.startswith("JSON "):
            r = json.loads(line[5:])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            return r
    raise RuntimeError(f"wrk failed: {p.stdout}\n{p.stderr}")


def pct(values: list[float], q: float) -> float | None:
    v = load.percentile(values, q)
    return None if v is None else v * 1000  # ms


def _cpu_note(r: dict[str, Any], per: int) -> str:
    """For the progress log: the sidecar's CPU per request/chunk, or LiteLLM's."""
    who, cpu = ("LiteLLM", r["litellm_cpu_s"]) if r.get("litellm_cpu_s") is not None else ("sidecar", r["sidecar_cpu_s"] or 0.0)
    return f"{who} {1e6 * cpu / max(1, per):.1f} us"


def run_scenarios(stacks: list[Stack], prof: Profile, workdir: Path, log: Any) -> dict[str, dict[str, Any]]:
    scripts = {s.name: wrk_script(workdir / f"chat-{s.name}.lua", CHAT_REQUEST, s.headers) for s in stacks}
    res: dict[str, dict[str, Any]] = {s.name: {} for s in stacks}

    def sse(s: Stack, extra: dict[str, str]) -> bytes:
        return load.raw_request(s.sse_path, s.stream_body, "bench", {**s.headers, **extra})

    for s in stacks:  # warm-up: connections, ext_proc HTTP/2 pools, code paths
        wrk(s.port, scripts[s.name], 16, prof.warmup_s)
        asyncio.run(
            load.fixed_rate(
                "127.0.0.1", s.port, sse(s, {"x-chunks": "5", "x-chunk-interval-ms": "0"}), 20, prof.warmup_s, sse=True, warm_connections=4
            )
        )

    def measure(s: Stack, key: str, fn: Any) -> dict[str, Any]:
        before = s.snapshot()
        with RssPeak(s.worker_pids() if s.has_sidecar or s.is_litellm else []) as peak:
            out = fn()
            # let async work finish: observability-mode streams, LiteLLM's logging callbacks
            time.sleep(0.5 if s.is_litellm else 0.3 if s.name.startswith("observe") else 0.05)
        out.update(delta(before, s.snapshot()))
        out["rss_peak_mb"] = peak.max_mb
        res[s.name][key] = out
        return out

    for c in prof.concurrency:
        for s in stacks:
            r = measure(s, f"c{c}", lambda: wrk(s.port, scripts[s.name], c, prof.throughput_s))
            log(
                f"  {s.name:8} c={c:<3} {r['rps']:8.0f} req/s  p50 {r['p50_us'] / 1000:.2f} ms  p99 {r['p99_us'] / 1000:.2f} ms  "
                f"{_cpu_note(r, r['requests'])}/req  observed {r['counts'].get('observed', '-')}/{r['requests']}"
            )
    for rate in prof.rates:
        for s in stacks:
            if s.is_litellm and rate > prof.litellm_max_rate:
                log(f"  {s.name:8} {rate}/s  skipped (above litellm_max_rate {prof.litellm_max_rate})")
                continue
            raw = load.raw_request(s.chat_path, CHAT_REQUEST, "bench", s.headers)

            def fixed() -> dict[str, Any]:
                r = asyncio.run(load.fixed_rate("127.0.0.1", s.port, raw, rate, prof.rate_s))
                return {
                    "sent": r.sent,
                    "requests": r.ok,
                    "errors": r.errors,
                    "new_connections": r.new_connections,
                    "p50_ms": pct(r.latencies, 50),
                    "p99_ms": pct(r.latencies, 99),
                    "p999_ms": pct(r.latencies, 99.9),
                    "driver_lag_max_ms": r.lag_max * 1000,
                }

            r = measure(s, f"rate{rate}", fixed)
            log(
                f"  {s.name:8} {rate}/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  errors {r['errors']}  "
                f"{_cpu_note(r, r['requests'])}/req"
            )
    for s in stacks:
        stream_req = sse(s, {"x-chunks": str(prof.chunks), "x-chunk-interval-ms": str(prof.chunk_interval_ms)})

        def streams() -> dict[str, Any]:
            r = asyncio.run(load.fixed_rate("127.0.0.1", s.port, stream_req, prof.stream_rate, prof.stream_s, sse=True))
            return {
                "sent": r.sent,
                "requests": r.ok,
                "errors": r.errors,
                "events": r.events,
                "ttfb_p50_ms": pct(r.ttfb, 50),
                "ttfb_p99_ms": pct(r.ttfb, 99),
                "chunk_p50_ms": pct(r.chunk_transit, 50),
                "chunk_p99_ms": pct(r.chunk_transit, 99),
            }

        r = measure(s, "stream", streams)
        log(
            f"  {s.name:8} streams {prof.stream_rate}/s x {prof.chunks} chunks  TTFB p50 {r['ttfb_p50_ms']:.3f} ms p99 {r['ttfb_p99_ms']:.3f}  "
            f"chunk p50 {r['chunk_p50_ms']:.3f} ms p99 {r['chunk_p99_ms']:.3f}  {_cpu_note(r, r['events'])}/chunk"
        )
    for s in stacks:
        if not (s.has_sidecar or s.is_litellm):
            continue
        hold = sse(s, {"x-chunks": "50", "x-chunk-interval-ms": "1000"})
        idle = {p: rss_mb(p) for p in s.worker_pids()}

        async def held() -> dict[str, Any]:
            conns, n = await load.hold_streams("127.0.0.1", s.port, hold, prof.hold_streams)
            await asyncio.sleep(0.5)
            busy = {p: rss_mb(p) for p in s.worker_pids()}
            load.release(conns)
            await asyncio.sleep(0.2)
            return {"open_streams": n, "rss_idle_mb": idle, "rss_streams_mb": busy}

        r = asyncio.run(held())
        r["rss_streams_max_mb"] = max(r["rss_streams_mb"].values())
        r["rss_idle_max_mb"] = max(r["rss_idle_mb"].values())
        res[s.name]["hold"] = r
        log(
            f"  {s.name:8} {r['open_streams']} open streams: RSS/worker max {r['rss_streams_max_mb']:.1f} MB (idle {r['rss_idle_max_mb']:.1f} MB)"
        )
    for s in stacks:
        if s.has_sidecar:
            res[s.name]["envoy_ext_proc_stats"] = s.envoy_stats()
    return res


# ---- report ------------------------------------------------------------------------------------
def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def summarize(res: dict[str, dict[str, Any]], prof: Profile) -> list[dict[str, Any]]:
    """Rows: (metric, value per stack, comparison vs envoy)."""
    rows: list[dict[str, Any]] = []

    def add(metric: str, key: str, get: Any, nd: int = 2, compare: str = "diff") -> None:
        vals = {}
        for name, r in res.items():
            try:
                vals[name] = get(r[key]) if key else get(r)
            except (KeyError, TypeError, ZeroDivisionError):
                vals[name] = None
        rows.append({"metric": metric, "values": vals, "nd": nd, "compare": compare})

    per_req = lambda r: 1e6 * r["sidecar_cpu_s"] / r["requests"]  # noqa: E731
    proxy_per_req = lambda r: 1e6 * r["proxy_cpu_s"] / r["requests"]  # noqa: E731
    for c in prof.concurrency:
        add(f"throughput c={c} (req/s)", f"c{c}", lambda r: r["rps"], 0, "ratio")
    for c in prof.concurrency:
        add(f"p99 latency c={c} (ms)", f"c{c}", lambda r: r["p99_us"] / 1000)
    for rate in prof.rates:
        add(f"p50 latency @{rate} req/s (ms)", f"rate{rate}", lambda r: r["p50_ms"], 3)
        add(f"p99 latency @{rate} req/s (ms)", f"rate{rate}", lambda r: r["p99_ms"], 3)
    c = prof.concurrency[-1]
    add(f"sidecar CPU per request, c={c} (us)", f"c{c}", per_req, 0, "none")
    add(f"sidecar CPU per request @{prof.rates[0]} req/s (us)", f"rate{prof.rates[0]}", per_req, 0, "none")
    add(f"Envoy CPU per request, c={c} (us)", f"c{c}", lambda r: 1e6 * r["envoy_cpu_s"] / r["requests"], 0)
    add(f"proxy CPU per request, c={c} (us): Envoy + sidecar, or LiteLLM", f"c{c}", proxy_per_req, 0, "ratio")
    add(f"proxy CPU per request @{prof.rates[0]} req/s (us)", f"rate{prof.rates[0]}", proxy_per_req, 0, "ratio")
    msgs = lambda r: r["msgs"]["stream_msgs_sent"] / r["requests"] if r["msgs"] else 0.0  # noqa: E731
    add(f"ext_proc messages per call, c={c} (Envoy stream_msgs_sent)", f"c{c}", msgs, 2, "none")
    add(
        f"ext_proc replies per call, c={c} (Envoy stream_msgs_received)",
        f"c{c}",
        lambda r: r["msgs"]["stream_msgs_received"] / r["requests"] if r["msgs"] else 0.0,
        2,
        "none",
    )
    add(f"ext_proc messages per stream ({prof.chunks} chunks)", "stream", msgs, 1, "none")
    add(
        f"busiest/idlest sidecar worker CPU share, c={c}",
        f"c{c}",
        lambda r: r["worker_cpu_s"][0] / max(1e-9, r["worker_cpu_s"][-1]) if len(r["worker_cpu_s"]) > 1 else 1.0,
        2,
        "none",
    )
    add(
        f"fully observed calls, c={c} (%)",
        f"c{c}",
        lambda r: 100 * r["counts"]["observed"] / r["requests"] if r["counts"] else None,
        1,
        "none",
    )
    add(
        f"fully observed calls @{prof.rates[-1]} req/s (%)",
        f"rate{prof.rates[-1]}",
        lambda r: 100 * r["counts"]["observed"] / r["sent"] if r["counts"] else None,
        1,
        "none",
    )
    add(f"stream TTFB p50 ({prof.stream_rate} streams/s) (ms)", "stream", lambda r: r["ttfb_p50_ms"], 3)
    add("stream TTFB p99 (ms)", "stream", lambda r: r["ttfb_p99_ms"], 3)
    add(f"per-chunk transit p50 ({prof.chunks} chunks/stream) (ms)", "stream", lambda r: r["chunk_p50_ms"], 3)
    add("per-chunk transit p99 (ms)", "stream", lambda r: r["chunk_p99_ms"], 3)
    add("sidecar CPU per chunk (us)", "stream", lambda r: 1e6 * r["sidecar_cpu_s"] / r["events"], 1, "none")
    add("Envoy CPU per chunk (us)", "stream", lambda r: 1e6 * r["envoy_cpu_s"] / r["events"], 1)
    add("proxy CPU per chunk (us): Envoy + sidecar, or LiteLLM", "stream", lambda r: 1e6 * r["proxy_cpu_s"] / r["events"], 1, "ratio")
    add("fully observed streams (%)", "stream", lambda r: 100 * r["counts"]["observed"] / r["sent"] if r["counts"] else None, 1, "none")
    add(
        f"streams refused @{prof.rates[-1]} req/s (% of sent; limits.maxStreams / maxWaitingStreams)",
        f"rate{prof.rates[-1]}",
        lambda r: 100 * r["counts"]["refused"] / r["sent"] if r["counts"] else None,
        1,
        "none",
    )
    add(f"sidecar (or LiteLLM) RSS per worker, peak during c={c} (MB)", f"c{c}", lambda r: r["rss_peak_mb"], 1, "none")
    add(
        f"sidecar (or LiteLLM) RSS per worker, peak during @{prof.rates[-1]} req/s (MB)",
        f"rate{prof.rates[-1]}",
        lambda r: r["rss_peak_mb"],
        1,
        "none",
    )
    add("sidecar (or LiteLLM) RSS per worker, idle (MB)", "hold", lambda r: r["rss_idle_max_mb"], 1, "none")
    add(f"sidecar (or LiteLLM) RSS per worker, {prof.hold_streams} open streams (MB)", "hold", lambda r: r["rss_streams_max_mb"], 1, "none")
    add("open streams reached", "hold", lambda r: r["open_streams"], 0, "none")
    return rows


def markdown(rows: list[dict[str, Any]], names: list[str]) -> str:
    head = ["metric", *names]
    others = [n for n in names if n != "envoy"]
    head += [f"{n} vs envoy" for n in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        v = row["values"]
        cells = [row["metric"], *(_f(v.get(n), row["nd"]) for n in names)]
        for n in others:
            a, b = v.get(n), v.get("envoy")
            if row["compare"] == "none" or a is None or b is None:
                cells.append("")
            elif row["compare"] == "ratio":
                cells.append(f"x{a / b:.2f}" if b else "")
            else:
                cells.append(f"{a - b:+.3f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _get(res: dict[str, dict[str, Any]], stack: str, key: str, fn: Any) -> float | None:
    try:
        v = fn(res[stack][key])
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return None if v is None else float(v)


def _x(a: float | None, b: float | None) -> str:
    r = litellm.times_less(a, b)
    return "-" if r is None else f"x{r:,.1f}"


def litellm_side_by_side(res: dict[str, dict[str, Any]], prof: Profile) -> str:
    """Under the table when the litellm stack ran: LiteLLM's CPU per call against Envoy alone's and
    each sidecar's ("xN less"), and the latency each adds over Envoy alone, side by side."""
    if "litellm" not in res:
        return ""
    others = [n for n in res if n not in ("litellm", "envoy")]
    c, rate = prof.concurrency[-1], prof.rates[0]
    head = ["figure", "litellm", *(["envoy"] if "envoy" in res else []), *others]
    out = [
        f'**LiteLLM side by side** (its whole process tree is the proxy; "xN less": LiteLLM\'s figure / the '
        f'other\'s; "added": over Envoy alone). CPU per call: c={c} and @{rate} req/s; per chunk: streams.',
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def per(key: str, n: str) -> Any:
        return lambda r: 1e6 * r[key] / r[n]

    for label, scen, n in (
        (f"CPU per call, c={c} (us)", f"c{c}", "requests"),
        (f"CPU per call @{rate} req/s (us)", f"rate{rate}", "requests"),
        ("CPU per chunk (us)", "stream", "events"),
    ):
        theirs = _get(res, "litellm", scen, per("proxy_cpu_s", n))
        row = [label, _f(theirs, 0)]
        if "envoy" in res:
            env = _get(res, "envoy", scen, per("envoy_cpu_s", n))
            row.append(f"{_f(env, 0)} ({_x(theirs, env)} less)")
        for o in others:
            side, both = _get(res, o, scen, per("sidecar_cpu_s", n)), _get(res, o, scen, per("proxy_cpu_s", n))
            row.append(f"sidecar {_f(side, 0)}: **{_x(theirs, side)} less**; Envoy + sidecar {_f(both, 0)}: {_x(theirs, both)} less")
        out.append("| " + " | ".join(row) + " |")

    def added(label: str, scen: str, keys: tuple[str, ...]) -> None:
        base = [_get(res, "envoy", scen, lambda r, k=k: r[k]) for k in keys]

        def over(stack: str) -> list[float | None]:
            return [_sub(_get(res, stack, scen, lambda r, k=k: r[k]), b) for k, b in zip(keys, base, strict=True)]

        theirs = over("litellm")
        row = [label, " / ".join(f"{v:+.2f}" if v is not None else "-" for v in theirs)]
        if "envoy" in res:
            row.append("0")
        for o in others:
            ours = over(o)
            row.append(
                " / ".join(f"{v:+.2f}" if v is not None else "-" for v in ours)
                + " (LiteLLM adds "
                + " / ".join(_x(a, b) for a, b in zip(theirs, ours, strict=True))
                + ")"
            )
        out.append("| " + " | ".join(row) + " |")

    if "envoy" in res:
        added(f"added p50 / p99 @{rate} req/s (ms)", f"rate{rate}", ("p50_ms", "p99_ms"))
        added("added stream TTFB p50 / per-chunk transit p50 (ms)", "stream", ("ttfb_p50_ms", "chunk_p50_ms"))
    row = [f"RSS per worker, idle / {prof.hold_streams} open streams (MB)"]
    for n in head[1:]:
        idle, held = _get(res, n, "hold", lambda r: r["rss_idle_max_mb"]), _get(res, n, "hold", lambda r: r["rss_streams_max_mb"])
        row.append(f"{_f(idle, 1)} / {_f(held, 1)}")
    out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: check every figure is produced")
    ap.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="sidecar workers, and LiteLLM's --num_workers (default: CPU count)"
    )
    ap.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads (default 2)")
    ap.add_argument(
        "--stacks",
        default=DEFAULT_STACKS,
        help=f"which stacks (comma separated; default {DEFAULT_STACKS}): envoy alone, inline, fewer "
        "(fewer-messages mode, HTTP/2 upstream), observe (observability_mode), observe-fewer (both, HTTP/2 "
        "upstream; only when asked), "
        "traced (inline, tracing on, OTLP collector unreachable), traced-live (collector up), "
        "litellm (the LiteLLM proxy, pinned, in .venv-litellm: installed on first use; only when asked)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--label", default="", help="suffix for the result file names")
    ap.add_argument(
        "--rates",
        help="fixed rates in req/s, comma separated (default 500,1500); the last one is the overload row (refused streams, peak RSS)",
    )
    args = ap.parse_args(argv)
    prof = QUICK if args.quick else Profile()
    if args.rates:
        prof = replace(prof, rates=tuple(int(r) for r in args.rates.split(",")))
    if "litellm" in args.stacks.split(","):
        prof = replace(prof, rates=(prof.litellm_rate, *prof.rates), stream_rate=min(prof.stream_rate, prof.litellm_stream_rate))
    if shutil.which("wrk") is None:
        print("bench: wrk not found (Debian: apt-get install -y wrk; `make bench` installs it)", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    names = args.stacks.split(",")
    if "litellm" in names:
        litellm.install(log)
    elif not litellm.installed():
        log(
            "bench: litellm stack skipped: not in --stacks and .venv-litellm absent "
            "(`--stacks envoy,inline,litellm` installs the pinned proxy there and runs it)"
        )
    else:
        log("bench: litellm stack skipped: not in --stacks (add it: --stacks envoy,inline,litellm)")
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    procs: list[subprocess.Popen] = []
    stacks: list[Stack] = []
    started = time.monotonic()
    try:
        up_port, sse_port = free_port(), free_port()
        (workdir / "upstream.yaml").write_text(direct_response_envoy(up_port))
        procs.append(
            subprocess.Popen(
                envoy_command(workdir / "upstream.yaml", "--concurrency", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(sse_port)], cwd=ROOT))
        wait_port(up_port, proc=procs[0])
        wait_port(sse_port, proc=procs[1])
        upstreams = [
            envoy_config.Upstream("/sse/", f"http://127.0.0.1:{sse_port}"),
            envoy_config.Upstream("/", f"http://127.0.0.1:{up_port}"),
        ]
        for name in names:
            st = Stack(name, workdir, upstreams, args.workers, args.envoy_concurrency)
            stacks.append(st)
            st.start(wait=not st.is_litellm)  # LiteLLM takes tens of seconds to import: the others start meanwhile
        for st in stacks:
            st.wait_ready()
        log(
            f"bench: {', '.join(s.name for s in stacks)}; sidecar (and LiteLLM) workers {args.workers}, "
            f"Envoy --concurrency {args.envoy_concurrency}; workdir {workdir}"
        )
        res = run_scenarios(stacks, prof, workdir, log)
    finally:
        for s in stacks:
            s.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
    names = [s.name for s in stacks]
    rows = summarize(res, prof)
    table = markdown(rows, names) + ("\n" + litellm_side_by_side(res, prof) if "litellm" in res else "")
    meta = {
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "workers": args.workers,
        "envoy_concurrency": args.envoy_concurrency,
        "litellm": litellm.REQUIREMENTS.read_text().split("\nlitellm[proxy]==", 1)[1].split()[0] if "litellm" in res else None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "envoy": envoy_binary(),
        "loadavg_before_end": os.getloadavg(),
        "duration_s": round(time.monotonic() - started, 1),
        "profile": prof.__dict__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else "") + ("-quick" if args.quick else "")
    doc = {"meta": meta, "results": res, "table": [{**r, "values": r["values"]} for r in rows]}
    for base in (args.out / stamp, args.out / ("latest-quick" if args.quick else "latest")):
        base.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
        base.with_suffix(".md").write_text(
            f"`{meta['command']}` ({meta['cpus']} CPUs, load avg {meta['loadavg_before_end'][0]:.1f}, {meta['duration_s']} s)\n\n" + table
        )
    print(table)
    log(f"bench: {meta['duration_s']} s; results in {args.out / stamp}.json/.md")
    return 0
