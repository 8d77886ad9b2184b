"""One Envoy + sidecar stack, closed-loop wrk: sidecar and Envoy CPU per request, for quick A/Bs.

    .venv/bin/python -m bench.ab -c 16 -d 4 --reps 2     # --workers 2, --tracing off|dead|live, --mode fewer-messages
    .venv/bin/python -m bench.ab grpclib --prof /tmp/w.prof      # the sidecar under cProfile (1 worker)

Lighter than ``python -m bench`` (one stack, one scenario), so A and B can be interleaved several
times within a minute on a noisy machine.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.procstat import cpu_seconds, process_rss, tree
from bench.run import wrk, wrk_script
from bench.upstream import CHAT_REQUEST, direct_response_envoy
from extproc.devtools import envoy_config
from extproc.devtools.dev import envoy_command, free_port, wait_port

ap = argparse.ArgumentParser(prog="bench.ab")
ap.add_argument("--prof", help="run the sidecar under cProfile, writing this file")
ap.add_argument("-c", type=int, default=16, help="wrk connections")
ap.add_argument("-d", type=float, default=5, help="seconds per measurement")
ap.add_argument("--workers", type=int, default=1)
ap.add_argument("--reps", type=int, default=1)
ap.add_argument("--mode", choices=["headers", "fewer-messages"], default="headers",
                help="ext_proc processing mode (fewer-messages: with HTTP/2 to the upstream)")
ap.add_argument("--upstream", choices=["http1", "http2", "auto"], default="auto",
                help="protocol to the upstream (auto: HTTP/2 in fewer-messages mode, else HTTP/1.1)")
ap.add_argument("--tracing", choices=["off", "dead", "live"], default="off",
                help="OTLP tracing: off; dead (collector port closed); live (an in-process OTLP/gRPC receiver)")
a = ap.parse_args()
d = Path(tempfile.mkdtemp(prefix="extproc-ab-"))
procs = []
try:
    up = free_port(); (d / "up.yaml").write_text(direct_response_envoy(up))
    procs.append(subprocess.Popen(envoy_command(d / "up.yaml", "--concurrency", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    sport = free_port()
    cfg = {"listen": f"127.0.0.1:{sport}", "stats": {"port": 0}, "logging": {"level": "warning"}}
    if a.tracing == "live":
        from tests.support.otlp_receiver import GrpcReceiver
        receiver = GrpcReceiver()
        cfg["tracing"] = {"otlpEndpoint": receiver.endpoint}
    elif a.tracing == "dead":
        cfg["tracing"] = {"otlpEndpoint": f"127.0.0.1:{free_port()}"}
    (d / "s.yaml").write_text(yaml.safe_dump(cfg))
    (d / "counts").mkdir()
    pre = [sys.executable, "-m", "cProfile", "-o", a.prof] if a.prof else [sys.executable]
    sc = subprocess.Popen([*pre, "-m", "bench.sidecar", "--config", str(d / "s.yaml"), "--workers", str(a.workers), "--counts", str(d / "counts")], stderr=open(d / "sidecar.log", "wb"))
    procs.append(sc)
    port, admin = free_port(), free_port()
    fewer = a.mode == "fewer-messages"
    boot = envoy_config.bootstrap(upstreams=[envoy_config.Upstream("/", f"http://127.0.0.1:{up}", http2=fewer if a.upstream == "auto" else a.upstream == "http2")], listen=f"127.0.0.1:{port}",
                                  extproc=f"127.0.0.1:{sport}", access_log=str(d / "access.log"), admin=f"127.0.0.1:{admin}", fewer_messages=fewer)
    (d / "e.yaml").write_text(envoy_config.dump(boot))
    ev = subprocess.Popen(envoy_command(d / "e.yaml", "--concurrency", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); procs.append(ev)
    wait_port(up, proc=procs[0]); wait_port(sport, proc=sc); wait_port(port, proc=ev)
    script = wrk_script(d / "chat.lua", CHAT_REQUEST)
    wrk(port, script, a.c, 1)
    for _ in range(a.reps):
        workers = tree(sc.pid)[1:]

        def waits() -> list[float]:  # seconds runnable but not running (all threads), per worker
            out = []
            for w in workers:
                total = 0
                for tid in os.listdir(f"/proc/{w}/task"):
                    with open(f"/proc/{w}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[1])
                out.append(total / 1e9)
            return out

        q0 = waits()
        s0, e0, w0 = cpu_seconds(tree(sc.pid)), cpu_seconds([ev.pid]), [cpu_seconds([w]) for w in workers]
        r = wrk(port, script, a.c, a.d)
        s1, e1, w1 = cpu_seconds(tree(sc.pid)), cpu_seconds([ev.pid]), [cpu_seconds([w]) for w in workers]
        share = sorted((y - x for x, y in zip(w0, w1)), reverse=True)
        rq = [y - x for x, y in zip(q0, waits())]
        print(f"c={a.c}: {r['rps']:.0f} req/s sidecar {1e6*(s1-s0)/r['requests']:.0f} us/req envoy {1e6*(e1-e0)/r['requests']:.0f} us/req p99 {r['p99_us']/1000:.1f} ms non2xx {r['non2xx']} err {r['errors']}"
              + (f" workers {'/'.join(f'{x:.2f}' for x in share)} s" if share else "")
              + (f" run-queue wait {'/'.join(f'{x:.2f}' for x in rq)} s" if rq else ""), flush=True)
    rss = []
    for w in tree(sc.pid)[1:] or [sc.pid]:
        rss.append(process_rss(w) / 2**20)
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=(ext_proc\\.(stream|failure|message|spurious)|rq_5xx|rq_503|reset|overflow|cx_destroy|llm_)", timeout=5) as resp:
        stats = [line for line in resp.read().decode().splitlines() if not line.endswith(": 0")]
    print("Envoy stats (non-zero):", "; ".join(stats), flush=True)
    codes: dict[str, int] = {}
    for line in (d / "access.log").read_text().splitlines():
        code = line.split('"response_code":', 1)[1].split(",", 1)[0]
        codes[code] = codes.get(code, 0) + 1
    print("response codes (access log):", codes, flush=True)
    print(f"sidecar RSS per worker after the runs: {'/'.join(f'{x:.1f}' for x in rss)} MB", flush=True)
finally:
    for p in reversed(procs):
        p.terminate()
        p.wait(10)
    if not a.prof:
        shutil.rmtree(d, ignore_errors=True)
