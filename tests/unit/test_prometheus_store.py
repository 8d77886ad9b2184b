"""A full metrics filesystem: prometheus-client's mmap growth on a full tmpfs
raised SIGBUS and killed the process. Now the space is reserved first (ENOSPC instead), the
failure is logged once with its cause, the lost updates are counted, and the process goes on.

The recording runs in a child process (multiprocess mode is process-wide, and a regression would
kill the test runner with SIGBUS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.support.harness import REPO
from tests.support.tmpfs import tiny_tmpfs

RECORD = r"""
import json, logging, sys
from extproc.core import logs
from extproc.telemetry.prometheus_endpoint import MultiprocDir
logs.setup("info")
MultiprocDir()  # PROMETHEUS_MULTIPROC_DIR is the tmpfs
from prometheus_client import CollectorRegistry
from extproc.core import config
from extproc.core.call import OK, Call
from extproc.telemetry import prometheus_store
from extproc.telemetry.metrics import MetricsObserver, process_registry
prometheus_store.register_counter(process_registry())
obs = MetricsObserver(config.Config().stats, process_registry())
for i in range(int(sys.argv[1])):
    c = Call(provider="openai", api="openai.chat", status=200, outcome=OK, start=0.0, first_chunk=0.1, end=0.5)
    c.obs.operation, c.obs.request_model, c.obs.streaming = "chat", f"model-{i:04d}-" + "x" * 100, True
    c.obs.usage.input_tokens, c.obs.usage.output_tokens = 3, 4
    obs.on_call_end(c)
print(json.dumps({"failures": obs.failures, "dropped": prometheus_store.dropped()}))
"""


def _record(tmp_path, size: str, calls: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    with tiny_tmpfs(tmp_path / "metrics", size) as d:
        env = {"PROMETHEUS_MULTIPROC_DIR": str(d), "PATH": "/usr/bin:/bin"}
        r = subprocess.run([sys.executable, "-c", RECORD, str(calls)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    return r, lines


def test_full_tmpfs_costs_metrics_not_the_process(tmp_path):
    r, lines = _record(tmp_path, "200k", 300)
    assert r.returncode == 0, f"exit {r.returncode} (-7 is SIGBUS): {r.stderr[-1500:]}"
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["failures"] == 0 and result["dropped"] > 0
    storage = [line for line in lines if line["msg"].startswith("metrics storage failed")]
    assert len(storage) == 1  # once per process, with the cause
    assert storage[0]["errno"] == 28 and "No space left" in storage[0]["error"]


def test_unwritable_directory_costs_metrics_not_the_process(tmp_path):
    with tiny_tmpfs(tmp_path / "ro", "64k") as d:
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        env = {"PROMETHEUS_MULTIPROC_DIR": str(d), "PATH": "/usr/bin:/bin"}
        r = subprocess.run([sys.executable, "-c", RECORD, "20"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(r.stdout.splitlines()[-1])["dropped"] > 0
    errors = [json.loads(line) for line in r.stderr.splitlines() if '"metrics storage failed' in line]
    assert len(errors) == 1 and errors[0]["errno"] == 30  # EROFS


FORK = r"""
import json, os
from extproc.telemetry import prometheus_store
prometheus_store.install()
from prometheus_client import CollectorRegistry, Counter
c = Counter("forked", "x", registry=CollectorRegistry())
c.inc(5)
pid = os.fork()
if pid == 0:
    c.inc(2)  # the child's values start over, in a file of its own
    os._exit(0)
os.waitpid(pid, 0)
c.inc(1)
print(json.dumps({"parent": os.getpid(), "child": pid}))
"""


def _forked(tmp_path, script: str) -> CollectorRegistry:
    """The values ``script`` (which forks once and prints the parent's and the child's pids)
    recorded in multiprocess mode in ``tmp_path``, summed over the processes' files as the
    endpoint sums them, once each process is checked to have written a file of its own."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    pids = json.loads(out.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"counter_{pids[k]}.db" for k in ("parent", "child"))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    return registry


def test_a_forked_worker_writes_its_own_values(tmp_path):
    """prometheus-client's process id (read without a system call, refreshed in a forked child)
    still starts a forked worker's values over, in its own file, as with ``os.getpid``."""
    assert _forked(tmp_path, FORK).get_sample_value("forked_total") == 8  # 5 + 1 in the parent, 2 in the child


FORK_ADDER = r"""
import json, os
from extproc.telemetry import prometheus_compat, prometheus_store
prometheus_store.install()
from prometheus_client import CollectorRegistry, Counter
c = Counter("forked", "x", registry=CollectorRegistry())
add = prometheus_compat.adder(c)  # made before the fork, used on both sides of it
add(5)
d = Counter("made_before", "x", registry=CollectorRegistry())
d.inc(5)  # its value made before the fork, its adder after
pid = os.fork()
if pid == 0:
    prometheus_compat.adder(d)(2)  # the child's first touch of any value: its own file too
    add(2)  # still the child's own file: the update made in another process goes through ``inc``
    os._exit(0)
os.waitpid(pid, 0)
add(1)
d.inc(1)
print(json.dumps({"parent": os.getpid(), "child": pid}))
"""


def test_a_value_s_adder_made_before_a_fork_writes_the_child_s_own_file(tmp_path):
    """``SafeValue.adder`` skips prometheus-client's process check per update, but not across a
    fork: the child's updates start over in its own file, as ``inc``'s do, whether the adder was
    made before the fork or after it for a value made before it (without the checks the child
    would write into the parent's mapped file, and the totals would not be 8)."""
    registry = _forked(tmp_path, FORK_ADDER)
    assert registry.get_sample_value("forked_total") == 8
    assert registry.get_sample_value("made_before_total") == 8


BROKEN_ADDER = r"""
import json
from extproc.telemetry import prometheus_compat, prometheus_store
prometheus_store.install()
from prometheus_client import CollectorRegistry, Counter
c = Counter("broken", "x", registry=CollectorRegistry())
add = prometheus_compat.adder(c)
add(1)
c._value._inner._file.close()  # its mapping gone, as after a failed reopen
add(1)  # fails: the value is dropped from now on, counted, never raised
add(1)
print(json.dumps({"dropped": prometheus_store.dropped(), "alive": c._value.alive}))
"""


def test_a_value_s_adder_that_fails_drops_the_value_and_counts_the_loss(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", BROKEN_ADDER], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(r.stdout.splitlines()[-1]) == {"dropped": 2, "alive": False}
    assert r.stderr.count("metrics storage failed") == 1
