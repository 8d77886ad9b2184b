"""`make soak`: a long accounting run through the real topology.

Mixed workload (streaming and not, several APIs, two teams) at concurrency 64 through Envoy + the
sidecar with 2 workers for --duration seconds, 10% of streaming clients aborting mid-stream.
Prints requests served, tokens expected vs counted (access log), client errors, and the sidecar's
RSS at start and end. Exits 1 if any count differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from bench.procstat import rss_bytes  # noqa: E402
from tests.support.harness import Stack  # noqa: E402
from tests.support.jwt_keys import jwks_json, token  # noqa: E402
from tests.support.replay_upstream import ReplayUpstream  # noqa: E402
from tests.support.workload import drive  # noqa: E402


def mb(rss: dict[int, int]) -> str:
    return " + ".join(f"{v / 2**20:.1f}" for v in rss.values()) + " MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--batch", type=int, default=640)
    ap.add_argument("--abort-ratio", type=float, default=0.1)
    args = ap.parse_args()
    tokens = {"dev": token("alice", "dev"), "ops": token("bob", "ops")}
    up = ReplayUpstream()
    expected: Counter[str] = Counter()
    served = errors = aborted = 0
    rids: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp), up.url, jwks_json=jwks_json(), workers=2) as s:
        assert s.sidecar is not None  # started by the Stack (start_sidecar's default)
        sidecar = s.sidecar
        time.sleep(1)
        rss_start = rss_bytes(sidecar.pid)
        t0 = time.monotonic()
        seed = 0
        history: list[dict[int, int]] = []
        while time.monotonic() - t0 < args.duration:
            seed += 1
            run = asyncio.run(drive(s.url(""), args.batch, args.concurrency, tokens, abort_ratio=args.abort_ratio, seed=seed, upstream=up))
            for r in run.results:
                rids.add(r.rid)
                served += 1
                aborted += r.aborted
                errors += r.error is not None or (not r.aborted and (r.status != 200 or not r.body_ok))
            for team in tokens:
                for k, v in run.expected(team).items():
                    expected[f"{team}.{k}"] += v
            rss = rss_bytes(sidecar.pid)
            history.append(rss)
            print(f"  {time.monotonic() - t0:6.0f}s  {served} requests, {errors} client errors, RSS {mb(rss)}", flush=True)
        elapsed = time.monotonic() - t0
        time.sleep(1.5)
        rss_end = rss_bytes(sidecar.pid)
        # Envoy's own view: a message the sidecar did not answer in time (or a failed stream) makes
        # Envoy fail open, and that call's metadata is missed. Non-zero here explains a shortfall.
        envoy = {
            k: s.envoy_stat(f"http.llm.ext_proc.{k}")
            for k in ("streams_started", "message_timeouts", "failure_mode_allowed", "streams_failed")
        }
        counted: Counter[str] = Counter()
        logged = 0
        with s.access_log.open() as f:
            for line in f:
                e = json.loads(line)
                if e["request_id"] in rids:
                    logged += 1
                    counted[f"{e['team']}.prompt"] += e["prompt_tokens"] or 0
                    counted[f"{e['team']}.completion"] += e["completion_tokens"] or 0
                    counted[f"{e['team']}.total"] += e["total_tokens"] or 0
    up.close()
    print(f"\nsoak: {elapsed:.0f}s, {served} requests ({served / elapsed:.0f}/s), {aborted} aborted by the client, {errors} client errors")
    print(f"access-log lines: {logged} of {served}")
    print("Envoy ext_proc stats: " + ", ".join(f"{k} {v}" for k, v in envoy.items()))
    ok = errors == 0 and logged == served
    for key in sorted(expected):
        same = expected[key] == counted[key]
        ok &= same
        print(f"  {key:18} expected {expected[key]:>12}  counted {counted[key]:>12}  {'ok' if same else 'MISMATCH'}")
    print(f"sidecar RSS (parent + workers): start {mb(rss_start)}, end {mb(rss_end)}")
    if len(history) >= 4:  # after warm-up, memory should stay flat: compare the run's middle with its end
        print(f"sidecar RSS at the run's middle {mb(history[len(history) // 2])}, at its end {mb(history[-1])}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
