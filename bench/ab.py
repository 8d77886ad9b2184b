"""Envoy + sidecar stacks on one upstream: sidecar and Envoy CPU per request (or per streamed
chunk), for quick A/Bs.

    .venv/bin/python -m bench.ab -c 16 -d 4 --reps 2     # --workers 2, --tracing off|dead|live, --metrics
    .venv/bin/python -m bench.ab --mode observability    # any mode of `extproc envoy-config --mode` (extproc.devtools.modes)
    .venv/bin/python -m bench.ab --prof /tmp/w.prof      # the sidecar under cProfile (1 worker)
    .venv/bin/python -m bench.ab --sse 50 --rate 40 -d 5 --reps 3   # streams: CPU per chunk, and Envoy alone's
    .venv/bin/python -m bench.ab --sse 50 --reps 4 --checkout ../main --checkout .   # A/B of two checkouts (another checkout of the repo)
    .venv/bin/python -m bench.ab --sse 50 --reps 4 --event-loop asyncio    # the sidecar on asyncio's loop
    .venv/bin/python -m bench.ab --reps 4 --checkout . --checkout . --tracing off --tracing live   # what tracing costs
    .venv/bin/python -m bench.ab -c 64 --workers 2 --reps 4 --checkout . --checkout . \
        --envoy-variant base --envoy-variant oghttp2-off        # what an Envoy setting costs (ENVOY_VARIANTS)
    .venv/bin/python -m bench.ab --tracing live --reps 4 --checkout . --checkout . \
        --tracing-conventions genai --tracing-conventions genai,openinference   # what a convention costs

Lighter than ``python -m bench`` (one scenario), so A and B can be interleaved several times
within a minute on a noisy machine. With several ``--checkout``s, each gets its own sidecar (run
from that directory's code) and its own Envoy, and every rep measures each stack in turn.

``--sse N``: open-loop streams (``--rate`` per second) of N SSE events each, one every
``--interval`` ms, through ``bench.upstream``; an Envoy without the sidecar is measured in the
same reps, so the per-chunk ratio sidecar / Envoy alone comes from one run.
"""

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench import load
from bench.procstat import cpu_seconds, process_rss, tree
from bench.run import SSE_PATH, wrk, wrk_script
from bench.upstream import CHAT_REQUEST, STREAM_REQUEST, direct_response_envoy
from extproc.devtools import envoy_config, modes
from extproc.devtools.dev import envoy_command, free_port, wait_port


def _ext_proc_filter(boot: dict[str, Any]) -> dict[str, Any]:
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


def _hcm(boot: dict[str, Any]) -> dict[str, Any]:
    return boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _ext_proc_h2(boot: dict[str, Any]) -> dict[str, Any]:
    cluster = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "ext_proc")
    return cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"][
        "http2_protocol_options"
    ]


def _runtime(key: str, value: Any):
    def patch(boot: dict[str, Any]) -> None:
        layers = boot.setdefault("layered_runtime", {"layers": [{"name": "static", "static_layer": {}}]})["layers"]
        layers[0]["static_layer"][key] = value

    return patch


def _google_grpc(boot: dict[str, Any]) -> None:
    f = _ext_proc_filter(boot)
    cluster = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "ext_proc")
    sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    target = f"unix:{sa['pipe']['path']}" if "pipe" in sa else f"{sa['socket_address']['address']}:{sa['socket_address']['port_value']}"
    f["grpc_service"] = {"google_grpc": {"target_uri": target, "stat_prefix": "ext_proc"}}


def _access_log_one_metadata_field(boot: dict[str, Any]) -> None:
    """The access log's per-key ``%DYNAMIC_METADATA(ns:key)%`` fields as one field holding the
    namespace's whole Struct (a different log shape: measures what the per-key lookups cost)."""
    fmt = _hcm(boot)["access_log"][0]["typed_config"]["log_format"]["json_format"]
    ns = "ai.gateway.kgateway.dev"
    for k in [k for k, v in fmt.items() if isinstance(v, str) and v.startswith(f"%DYNAMIC_METADATA({ns}:")]:
        del fmt[k]
    fmt["ai"] = f"%DYNAMIC_METADATA({ns})%"


# Envoy settings to A/B (--envoy-variant, one per stack): each edits the generated bootstrap in
# place. Measurement only: none is the product's config until docs/performance.md says so.
ENVOY_VARIANTS: dict[str, Any] = {
    "base": lambda boot: None,
    "oghttp2-on": _runtime("envoy.reloadable_features.http2_use_oghttp2", True),
    "oghttp2-off": _runtime("envoy.reloadable_features.http2_use_oghttp2", False),
    "h2-windows-1m": lambda boot: _ext_proc_h2(boot).update(initial_stream_window_size=1 << 20, initial_connection_window_size=1 << 20),
    "h2-streams-100": lambda boot: _ext_proc_h2(boot).update(max_concurrent_streams=100),
    "no-message-timeout": lambda boot: _ext_proc_filter(boot).pop("message_timeout"),
    "no-metadata-options": lambda boot: _ext_proc_filter(boot).pop("metadata_options"),
    "no-access-log": lambda boot: _hcm(boot).pop("access_log"),
    "access-log-one-metadata-field": _access_log_one_metadata_field,
    "google-grpc": _google_grpc,
    "graceful-close": _runtime("envoy.reloadable_features.ext_proc_graceful_grpc_close", True),
}


def parser() -> argparse.ArgumentParser:
    """The command line; its --mode names are the CLI's (``extproc.devtools.modes``)."""
    ap = argparse.ArgumentParser(prog="bench.ab")
    ap.add_argument("--prof", help="run the (first) sidecar under cProfile, writing this file")
    ap.add_argument("-c", type=int, default=16, help="wrk connections")
    ap.add_argument("-d", type=float, default=5, help="seconds per measurement")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument(
        "--mode",
        choices=list(modes.MODES),
        default=modes.DEFAULT,
        help="the ext_proc mode, named as `extproc envoy-config|dev --mode` names it (fewer-messages modes: with HTTP/2 to the upstream)",
    )
    ap.add_argument(
        "--observe",
        action="store_true",
        help="the observability variant of --mode (--observe = --mode observability; with --mode fewer-messages: "
        "observability-fewer-messages); kept for older commands",
    )
    ap.add_argument(
        "--upstream",
        choices=["http1", "http2", "auto"],
        default="auto",
        help="protocol to the upstream (auto: HTTP/2 in fewer-messages mode, else HTTP/1.1)",
    )
    ap.add_argument(
        "--tracing",
        choices=["off", "dead", "live"],
        action="append",
        help="OTLP tracing: off (default); dead (collector port closed); live (an in-process OTLP/gRPC "
        "receiver): once for all stacks, or once per --checkout in order",
    )
    ap.add_argument(
        "--tracing-conventions",
        action="append",
        metavar="LIST",
        help="tracing.conventions, e.g. genai,openinference: once for all stacks, or once per --checkout in order",
    )
    ap.add_argument("--capture", action="store_true", help="tracing.captureContent: true")
    ap.add_argument(
        "--tracing-config",
        action="append",
        metavar="FILE",
        help="use the tracing section of this sidecar config (e.g. deploy/tracing/langfuse.yaml), endpoint "
        "replaced: once for all stacks, or once per --checkout in order",
    )
    ap.add_argument("--sse", type=int, metavar="N", help="streamed responses of N SSE events (instead of wrk)")
    ap.add_argument("--rate", type=float, default=40, help="--sse: streams started per second")
    ap.add_argument("--interval", type=float, default=2.0, help="--sse: ms between a stream's events")
    ap.add_argument("--event-loop", choices=["uvloop", "asyncio"], help="the sidecar's eventLoop (default: its config default)")
    ap.add_argument("--metrics", action="store_true", help="Prometheus metrics on (stats.port: a free port; default off)")
    ap.add_argument(
        "--streams-per-connection",
        type=int,
        action="append",
        metavar="N",
        help="Envoy's ext_proc streams per HTTP/2 connection (repeat: one per stack, the last for the rest)",
    )
    ap.add_argument(
        "--max-requests-per-connection",
        type=int,
        action="append",
        metavar="N",
        help="Envoy recycles an ext_proc connection after N streams, 0: never (repeat: one per stack; default: envoy_config's)",
    )
    ap.add_argument(
        "--envoy-variant",
        action="append",
        choices=list(ENVOY_VARIANTS),
        help="an Envoy setting to A/B, applied to the generated bootstrap (repeat: one per stack, the last for the rest)",
    )
    ap.add_argument(
        "--envoy-alone",
        action="store_true",
        help="also measure an Envoy without ext_proc (as --sse always does): Envoy's own cost per call, for comparison",
    )
    ap.add_argument("--unix", action="store_true", help="Envoy reaches the sidecar on a Unix socket instead of TCP")
    ap.add_argument(
        "--checkout",
        action="append",
        metavar="DIR",
        help="run a sidecar from this checkout's code (repeat for an A/B; default: the current directory)",
    )
    return ap


def mode_of(args: argparse.Namespace) -> modes.Mode:
    """The ext_proc mode asked for: --mode, made observability by --observe."""
    m = modes.MODES[args.mode]
    return modes.Mode(observability=True, fewer_messages=m.fewer_messages) if args.observe else m


def wait_unix(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with {proc.returncode} before listening on {path}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.1)
    raise TimeoutError(path)


def stack_option(values: list[int] | None, index: int) -> int | None:
    """A repeatable option's value for the stack at ``index``: the last one given for the rest."""
    return values[min(index, len(values) - 1)] if values else None


class Stack:
    def __init__(self, name: str, checkout: str | None, prof: str | None) -> None:
        self.name = name
        self.dir: Path = d / f"stack{len(stacks)}"
        self.dir.mkdir()
        self.sidecar: subprocess.Popen | None = None
        extproc = None
        if checkout is not None:
            sport = free_port()
            extproc = f"unix:{self.dir / 'extproc.sock'}" if a.unix else f"127.0.0.1:{sport}"
            cfg: dict[str, Any] = {"listen": extproc, "stats": {"port": free_port() if a.metrics else 0}, "logging": {"level": "warning"}}
            if a.event_loop:
                cfg["eventLoop"] = a.event_loop
            tracing = tracings[min(len(stacks), len(tracings) - 1)]
            if tracing == "live":
                cfg["tracing"] = {"otlpEndpoint": receiver.endpoint}
            elif tracing == "dead":
                cfg["tracing"] = {"otlpEndpoint": f"127.0.0.1:{free_port()}"}
            if tracing != "off" and a.tracing_config:
                endpoint = cfg["tracing"]["otlpEndpoint"]
                preset = a.tracing_config[min(len(stacks), len(a.tracing_config) - 1)]
                cfg["tracing"] = {**yaml.safe_load(Path(preset).read_text())["tracing"], "otlpEndpoint": endpoint}
                cfg["tracing"].pop("otlpProtocol", None)
                cfg["tracing"].pop("headers", None)
            if tracing != "off":
                conventions = a.tracing_conventions or []
                mine = conventions[min(len(stacks), len(conventions) - 1)] if conventions else None
                if mine:
                    cfg["tracing"]["conventions"] = mine.split(",")
                if a.capture:
                    cfg["tracing"]["captureContent"] = True
            (self.dir / "s.yaml").write_text(yaml.safe_dump(cfg))
            (self.dir / "counts").mkdir()
            pre = [sys.executable, "-m", "cProfile", "-o", prof] if prof else [sys.executable]
            self.sidecar = subprocess.Popen(
                [
                    *pre,
                    "-m",
                    "bench.sidecar",
                    "--config",
                    str(self.dir / "s.yaml"),
                    "--workers",
                    str(a.workers),
                    "--counts",
                    str(self.dir / "counts"),
                ],
                cwd=checkout,
                env={**os.environ, "PYTHONPATH": checkout},
                stderr=open(self.dir / "sidecar.log", "wb"),
            )
            procs.append(self.sidecar)
        self.port: int = free_port()
        self.admin: int = free_port()
        spc = stack_option(a.streams_per_connection, len(stacks))
        mrpc = stack_option(a.max_requests_per_connection, len(stacks))
        boot = envoy_config.bootstrap(
            upstreams=upstreams,
            extproc_streams_per_connection=spc or envoy_config.EXTPROC_STREAMS_PER_CONNECTION,
            extproc_max_requests_per_connection=envoy_config.EXTPROC_MAX_REQUESTS_PER_CONNECTION if mrpc is None else mrpc or None,
            listen=f"127.0.0.1:{self.port}",
            extproc=extproc,
            access_log=str(self.dir / "access.log"),
            admin=f"127.0.0.1:{self.admin}",
            fewer_messages=mode.fewer_messages,
            observability_mode=mode.observability,
        )
        variant = a.envoy_variant[min(len(stacks), len(a.envoy_variant) - 1)] if a.envoy_variant and checkout else None
        boot_d = envoy_config.to_dict(boot)
        if variant:
            ENVOY_VARIANTS[variant](boot_d)
        (self.dir / "e.yaml").write_text(yaml.safe_dump(boot_d, sort_keys=False, width=120))
        self.envoy = subprocess.Popen(
            envoy_command(self.dir / "e.yaml", "--concurrency", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(self.envoy)
        if self.sidecar is not None:
            if a.unix:
                wait_unix(str(self.dir / "extproc.sock"), self.sidecar)
            else:
                wait_port(sport, proc=self.sidecar)
        wait_port(self.port, proc=self.envoy)
        self.results: list[dict[str, float]] = []

    def workers(self) -> list[int]:
        return tree(self.sidecar.pid)[1:] if self.sidecar else []

    def stats(self, filt: str) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?filter={filt}", timeout=5) as resp:
            return [
                line
                for line in resp.read().decode().splitlines()
                if not line.endswith(": 0") and "P0(" not in line and "No recorded values" not in line
            ]

    def connections(self) -> int:
        """HTTP/2 connections Envoy has opened to the sidecar so far."""
        return sum(int(line.rpartition(": ")[2]) for line in self.stats("cluster.ext_proc.upstream_cx_total"))

    def upstream(self) -> tuple[int, int]:
        """Connections Envoy has opened to the LLM upstreams so far, and requests sent on them: a
        connection per request would tax every stack's Envoy with a connect (docs/performance.md)."""
        totals = {"upstream_cx_total": 0, "upstream_rq_total": 0}
        for line in self.stats("cluster\\.llm_.*\\.upstream_(cx|rq)_total$"):
            name, _, value = line.rpartition(": ")
            totals[name.rpartition(".")[2]] += int(value)
        return totals["upstream_cx_total"], totals["upstream_rq_total"]

    def msgs_sent(self) -> int:
        return sum(int(line.rpartition(": ")[2]) for line in self.stats("ext_proc.stream_msgs_sent"))


def run_wrk(s: Stack) -> tuple[int, str]:
    r = wrk(s.port, script, a.c, a.d)
    return r["requests"], (f"{r['rps']:.0f} req/s p99 {r['p99_us'] / 1000:.1f} ms non2xx {r['non2xx']} err {r['errors']}")


def run_sse(s: Stack) -> tuple[int, str]:
    r = asyncio.run(load.fixed_rate("127.0.0.1", s.port, sse_raw, a.rate, a.d, sse=True))
    return r.events, (
        f"{r.ok} streams {r.events} chunks, chunk transit p50 {1000 * (load.percentile(r.chunk_transit, 50) or 0):.2f} ms "
        f"p99 {1000 * (load.percentile(r.chunk_transit, 99) or 0):.2f} ms, err {r.errors}"
    )


def measure(s: Stack) -> None:
    workers = s.workers()

    def waits() -> list[float]:  # seconds runnable but not running (all threads), per worker
        out = []
        for w in workers:
            total = 0
            try:  # a worker gone (killed, restarted) counts 0, as in cpu_seconds
                for tid in os.listdir(f"/proc/{w}/task"):
                    with open(f"/proc/{w}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[1])
            except OSError:
                pass
            out.append(total / 1e9)
        return out

    q0 = waits()
    m0 = s.msgs_sent() if s.sidecar else 0
    c0 = s.connections() if s.sidecar else 0
    u0 = s.upstream()
    s0, e0, w0 = cpu_seconds(tree(s.sidecar.pid)) if s.sidecar else 0.0, cpu_seconds([s.envoy.pid]), [cpu_seconds([w]) for w in workers]
    n, text = run_sse(s) if a.sse else run_wrk(s)
    if mode.observability and s.sidecar:
        time.sleep(0.3)  # Envoy does not wait for the sidecar: let it finish the messages sent
    s1, e1, w1 = cpu_seconds(tree(s.sidecar.pid)) if s.sidecar else 0.0, cpu_seconds([s.envoy.pid]), [cpu_seconds([w]) for w in workers]
    m1 = s.msgs_sent() if s.sidecar else 0
    c1 = s.connections() if s.sidecar else 0
    ucx, urq = (y - x for x, y in zip(u0, s.upstream()))
    share = sorted((y - x for x, y in zip(w0, w1)), reverse=True)
    rq = [y - x for x, y in zip(q0, waits())]
    unit = "chunk" if a.sse else "req"
    n = max(1, n)
    res = {"sidecar": 1e6 * (s1 - s0) / n, "envoy": 1e6 * (e1 - e0) / n}
    s.results.append(res)
    print(
        f"{s.name:10} {text}: "
        + (f"sidecar {res['sidecar']:.0f} us/{unit} " if s.sidecar else "")
        + f"envoy {res['envoy']:.0f} us/{unit}"
        + (f" ext_proc msgs/{unit} {(m1 - m0) / n:.2f}" if s.sidecar else "")
        + (f" ext_proc connections opened {c1 - c0} (total {c1})" if s.sidecar else "")
        + f" upstream connections opened {ucx} for {urq} requests"
        + (f" workers {'/'.join(f'{x:.2f}' for x in share)} s" if share else "")
        + (f" run-queue wait {'/'.join(f'{x:.2f}' for x in rq)} s" if rq else ""),
        flush=True,
    )


if __name__ == "__main__":  # (imported by the tests for its command line)
    a = parser().parse_args()
    mode = mode_of(a)
    checkouts = [str(Path(c).resolve()) for c in a.checkout or ["."]]
    tracings = a.tracing or ["off"]
    d = Path(tempfile.mkdtemp(prefix="extproc-ab-"))
    procs: list[subprocess.Popen] = []
    try:
        if "live" in tracings:
            from tests.support.otlp_receiver import GrpcReceiver

            receiver = GrpcReceiver()
        up = free_port()
        (d / "up.yaml").write_text(direct_response_envoy(up))
        procs.append(
            subprocess.Popen(envoy_command(d / "up.yaml", "--concurrency", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        wait_port(up, proc=procs[0])
        http2 = mode.fewer_messages if a.upstream == "auto" else a.upstream == "http2"
        upstreams = [envoy_config.Upstream("/", f"http://127.0.0.1:{up}", http2=http2)]
        if a.sse:
            sse_up = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(sse_up)]))
            wait_port(sse_up, proc=procs[-1])
            upstreams.insert(0, envoy_config.Upstream("/sse/", f"http://127.0.0.1:{sse_up}"))
        stacks: list[Stack] = []
        per_stack = a.tracing_conventions or []
        for i, c in enumerate(checkouts):
            name = c if len(checkouts) > 1 else "sidecar"
            if len(tracings) > 1:
                name += f" [tracing {tracings[min(i, len(tracings) - 1)]}]"
            if len(per_stack) > 1:
                name += f" [{per_stack[min(i, len(per_stack) - 1)]}]"
            if a.tracing_config and len(a.tracing_config) > 1:
                name += f" [{a.tracing_config[min(i, len(a.tracing_config) - 1)]}]"
            if a.envoy_variant and len(a.envoy_variant) > 1:
                name += f" [{a.envoy_variant[min(i, len(a.envoy_variant) - 1)]}]"
            for label, values in (("streams/cx", a.streams_per_connection), ("max rq/cx", a.max_requests_per_connection)):
                if values and len(values) > 1:
                    name += f" [{label} {stack_option(values, i)}]"
            stacks.append(Stack(name, c, a.prof if i == 0 else None))
        if a.sse or a.envoy_alone:
            stacks.append(Stack("envoy-alone", None, None))
        script = wrk_script(d / "chat.lua", CHAT_REQUEST)
        sse_raw = load.raw_request(SSE_PATH, STREAM_REQUEST, "bench", {"x-chunks": str(a.sse or 1), "x-chunk-interval-ms": str(a.interval)})
        warm = load.raw_request(SSE_PATH, STREAM_REQUEST, "bench", {"x-chunks": "5", "x-chunk-interval-ms": "0"})
        for s in stacks:  # warm-up: connections, ext_proc HTTP/2 pools, code paths
            if a.sse:
                asyncio.run(load.fixed_rate("127.0.0.1", s.port, warm, 20, 1, sse=True, warm_connections=4))
            else:
                wrk(s.port, script, a.c, 1)
        for _ in range(a.reps):
            for s in stacks:
                measure(s)
        for s in stacks:
            med = {k: statistics.median(r[k] for r in s.results) for k in ("sidecar", "envoy")}
            unit = "chunk" if a.sse else "req"
            alone = next((x for x in stacks if x.sidecar is None), None)
            line = f"median {s.name}: envoy {med['envoy']:.1f} us/{unit}"
            if s.sidecar:
                line = f"median {s.name}: sidecar {med['sidecar']:.1f} us/{unit}, envoy {med['envoy']:.1f} us/{unit}, sidecar/envoy {med['sidecar'] / med['envoy']:.2f}"
                if alone is not None:
                    base = statistics.median(r["envoy"] for r in alone.results)
                    line += f", sidecar/envoy-alone {med['sidecar'] / base:.2f}"
            print(line, flush=True)
        for s in stacks:
            if s.sidecar is None:
                continue
            rss = [process_rss(w) / 2**20 for w in s.workers() or [s.sidecar.pid]]
            stats = s.stats("(ext_proc\\.(stream|failure|message|spurious)|rq_5xx|rq_503|reset|overflow|cx_destroy|llm_)")
            print(f"{s.name}: Envoy stats (non-zero):", "; ".join(stats), flush=True)
            codes: dict[str, int] = {}
            log = s.dir / "access.log"
            for line in log.read_text().splitlines() if log.exists() else []:  # (no access log: --envoy-variant no-access-log)
                code = line.split('"response_code":', 1)[1].split(",", 1)[0]
                codes[code] = codes.get(code, 0) + 1
            print(f"{s.name}: response codes (access log):", codes, flush=True)
            print(f"{s.name}: sidecar RSS per worker after the runs: {'/'.join(f'{x:.1f}' for x in rss)} MB", flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(10)
        if not a.prof:
            shutil.rmtree(d, ignore_errors=True)
