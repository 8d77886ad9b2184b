"""A SIGHUP reload is transactional: at each point where a new config can be
refused, the running state stays exactly as it was (settings, observers) and nothing built for
the refused config (a tracer's export thread) is left running; a FIFO is refused without
blocking. The supervisor adopts only a file the workers accept."""

from __future__ import annotations

import os
import threading

import pytest
import yaml

from extproc.core import config as config_mod
from extproc.core.config import ConfigError
from extproc.server import worker
from extproc.server.processor import Processor
from extproc.telemetry import observers as observers_mod

BASE = {
    "stats": {"port": 0},
    "tracing": {"otlpEndpoint": "127.0.0.1:9"},
    "metadata": {"namespace": "ns.one"},
    "providers": {"header": "x-one"},
    "limits": {"maxBodyBytes": 1 << 20},
}


def export_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "extproc-span-export" and t.is_alive())


@pytest.fixture
def running(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = config_mod.load(path)
    p = Processor(cfg, observers_mod.observers(cfg))
    before = export_threads()
    yield p, path, before
    worker.close_observers(p.observers)


def snapshot(p: Processor) -> tuple:
    s = p.settings
    return (s, s.config, s.config.metadata.namespace, s.provider_key, s.parser_limits, s.limits, s.router, tuple(p.observers), p.capture)


def applied(p: Processor) -> tuple:
    """The namespace, provider key and body limit the streams read."""
    s = p.settings
    return s.config.metadata.namespace, s.provider_key, s.parser_limits.max_body_bytes


def reload_from(path):
    return lambda: config_mod.load(path)


def refused(p: Processor, path, before: int, factory=observers_mod.observers) -> None:
    state = snapshot(p)
    assert worker.reconfigure(p, reload_from(path), factory) is False
    assert snapshot(p) == state
    assert export_threads() == before  # nothing built for the refused config is left running


def changed(**kw) -> dict:
    out = {**BASE, "metadata": {"namespace": "ns.two"}, "providers": {"header": "x-two"}, "limits": {"maxBodyBytes": 1024}}
    out.update(kw)
    return out


def test_unknown_route_api_changes_nothing_and_leaks_no_tracer_thread(running):
    """The reported case: namespace, limits and provider key were replaced although the reload
    was refused, and a tracer export thread was left behind every time."""
    p, path, before = running
    path.write_text(yaml.safe_dump(changed(providers={"header": "x-two", "routes": [{"pathRegex": "^/x$", "api": "nope"}]})))
    for _ in range(3):
        refused(p, path, before)
    assert applied(p) == ("ns.one", "x-one", 1 << 20)


def test_invalid_file_changes_nothing(running):
    p, path, before = running
    path.write_text("providers: [not, a, mapping]\n")
    refused(p, path, before)
    path.write_text(yaml.safe_dump(changed(limits={"maxBodyBytes": 1})))  # below the minimum
    refused(p, path, before)


def test_restart_only_key_changes_nothing(running):
    p, path, before = running
    path.write_text(yaml.safe_dump(changed(listen="127.0.0.1:1")))
    refused(p, path, before)


def test_observer_that_cannot_be_built_changes_nothing(running):
    p, path, before = running
    path.write_text(yaml.safe_dump(changed()))

    def failing(cfg):
        raise RuntimeError("exporter refused its settings")

    refused(p, path, before, failing)


def test_observers_built_before_a_failing_one_are_shut_down(running, monkeypatch):
    p, path, before = running
    path.write_text(yaml.safe_dump(changed(stats={"port": 9999})))
    built: list[object] = []
    real = observers_mod.CallLog

    class Recorded(real):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            built.append(self)

        def shutdown(self) -> None:
            built.remove(self)

    def broken(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(observers_mod, "CallLog", Recorded)
    monkeypatch.setattr("extproc.telemetry.metrics.MetricsObserver", broken)
    state = snapshot(p)
    with pytest.raises(OSError):
        observers_mod.observers(config_mod.load(path))
    assert built == []
    assert worker.reconfigure(p, reload_from(path), lambda c: [*observers_mod.observers(c)]) is False
    assert snapshot(p) == state and export_threads() == before  # stats.port is restart-only anyway


def test_fifo_is_refused_without_blocking(running, tmp_path):
    p, _, before = running
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(worker.reconfigure(p, reload_from(fifo), observers_mod.observers)))
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "w"):
            pass
        t.join(5)
        pytest.fail("a reload from a FIFO blocked")
    assert result == [False]
    with pytest.raises(ConfigError, match="not a regular file"):
        config_mod.load(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        config_mod.load(tmp_path)  # a directory


def test_accepted_reload_swaps_everything_and_ends_the_old_tracer_thread(running):
    p, path, before = running
    old_tracer = p.observers[-1]
    path.write_text(yaml.safe_dump(changed()))
    assert worker.reconfigure(p, reload_from(path), observers_mod.observers) is True
    assert applied(p) == ("ns.two", "x-two", 1024)
    assert old_tracer not in p.observers
    worker.finish_closing()  # the old tracer is shut down on a thread of its own: wait for it
    assert export_threads() == before  # the new tracer's thread replaced the old one's


def test_supervisor_check_is_the_workers_check():
    running_cfg = config_mod.parse(BASE)
    with pytest.raises(ConfigError, match="providers.routes.0.api"):
        worker.prepare(config_mod.parse(changed(providers={"routes": [{"pathRegex": "^/x$", "api": "nope"}]})), running_cfg)
    with pytest.raises(worker.RestartNeeded):
        worker.prepare(config_mod.parse(changed(listen="127.0.0.1:1")), running_cfg)
    with pytest.raises(worker.RestartNeeded, match="event_loop"):  # a running worker keeps its loop
        worker.prepare(config_mod.parse(changed(eventLoop="asyncio")), running_cfg)
    assert worker.prepare(config_mod.parse(changed()), running_cfg).config.metadata.namespace == "ns.two"
