"""``extproc.telemetry.prometheus_compat`` updates prometheus-client's value objects directly: the
exposition must equal ``inc``/``observe``'s for the same values, in-process and in multiprocess
(mmap) mode, and each private detail it uses must still exist in the installed release."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from prometheus_client import CollectorRegistry, Counter, Histogram

from extproc.telemetry import prometheus_compat
from extproc.telemetry.measurements import DURATION_BUCKETS, PROCESSING_BUCKETS, TOKEN_BUCKETS
from tests.support.harness import REPO

# Every bound exactly, between bounds, below the first, past the last, zero, +Inf, NaN.
VALUES = [
    *DURATION_BUCKETS,
    *(b * 0.999 for b in DURATION_BUCKETS),
    *(b * 1.001 for b in DURATION_BUCKETS),
    *TOKEN_BUCKETS,
    *PROCESSING_BUCKETS,
    0.0,
    1e-9,
    1e9,
    math.inf,
    math.nan,
    3,
    120,
]

SAMPLES = r"""
def samples(registry, CollectorRegistry, Counter, Histogram, prometheus_compat, values, buckets):
    c = Counter("c", "c", ["path"], registry=registry)
    hs = [Histogram(f"h{i}", "h", ["path"], buckets=b, registry=registry) for i, b in enumerate(buckets)]
    add = prometheus_compat.adder(c.labels("compat"))
    observes = [prometheus_compat.observer(h.labels("compat")) for h in hs]
    for v in values:
        if v >= 0:
            c.labels("api").inc(v)
            add(v)
        for h, observe in zip(hs, observes):
            h.labels("api").observe(v)
            observe(v)
    out = {}
    for m in registry.collect():
        for s in m.samples:
            if s.name.endswith("_created"):
                continue
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "path"))
            out.setdefault((s.name, labels), {})[s.labels.get("path")] = repr(s.value)
    return out
"""


def _samples(registry, values):
    ns: dict = {}
    exec(SAMPLES, ns)
    buckets = [DURATION_BUCKETS, TOKEN_BUCKETS, PROCESSING_BUCKETS]
    return ns["samples"](registry, CollectorRegistry, Counter, Histogram, prometheus_compat, values, buckets)


def test_updates_equal_inc_and_observe_in_process():
    out = _samples(CollectorRegistry(), [v for v in VALUES if not math.isnan(v)] + [math.nan])
    assert len(out) > 3 * 17
    for key, by_path in out.items():
        assert by_path["compat"] == by_path["api"], key


MULTI = (
    SAMPLES
    + r"""
import json, math, sys
from extproc.telemetry.prometheus_endpoint import MultiprocDir
MultiprocDir()
from extproc.telemetry import prometheus_store
prometheus_store.install()
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from extproc.telemetry import prometheus_compat
values, buckets = json.loads(sys.argv[1])
values = [float(v) for v in values]
samples(CollectorRegistry(), CollectorRegistry, Counter, Histogram, prometheus_compat, values, buckets)
read = CollectorRegistry()
MultiProcessCollector(read)
out = {}
for m in read.collect():
    for s in m.samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "path"))
        out.setdefault(repr((s.name, labels)), {})[s.labels.get("path")] = repr(s.value)
print(json.dumps(out))
"""
)


def test_updates_equal_inc_and_observe_in_multiprocess_mode(tmp_path):
    arg = json.dumps([[repr(v) if not math.isfinite(v) else v for v in VALUES], [DURATION_BUCKETS, TOKEN_BUCKETS, PROCESSING_BUCKETS]])
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", MULTI, arg], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert len(out) > 3 * 17
    for key, by_path in out.items():
        assert by_path["compat"] == by_path["api"], key


def test_the_client_internals_relied_on_exist():
    registry = CollectorRegistry()
    c = Counter("c", "c", ["a"], registry=registry).labels("x")
    h = Histogram("h", "h", ["a"], buckets=(1.0, 2.0), registry=registry)
    child = h.labels("x")
    assert hasattr(c._value, "inc") and hasattr(child._sum, "inc")
    assert child._upper_bounds == [1.0, 2.0, math.inf] and len(child._buckets) == 3
    assert (
        prometheus_compat.series_per_label_set(h) == 5 and prometheus_compat.series_per_label_set(Counter("d", "d", registry=registry)) == 1
    )
