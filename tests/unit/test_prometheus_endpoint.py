"""The /metrics endpoint's bounds, with real sockets on 127.0.0.1: idle and
half-sent requests are closed after readTimeoutSeconds without rendering; scrapes beyond
maxConcurrentScrapes get 503 at once; concurrent scrapes share one render, later ones within
renderIntervalSeconds reuse it; connections beyond maxConnections are closed at once."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from extproc.core import config
from extproc.telemetry.prometheus_endpoint import Endpoint


class SlowCollector:
    """A registry that yields ``series`` samples. A gated one's render waits until the test calls
    :meth:`release`: what the endpoint does while a render is in progress is then checked while
    it certainly is, however loaded the machine (a render timed with a sleep can end first)."""

    def __init__(self, series: int = 10, gated: bool = False) -> None:
        self.series = series
        self.calls = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def release(self) -> None:
        self.gate.set()

    def collect(self) -> Iterator[Any]:
        with self.lock:
            self.calls += 1
        if not self.gate.wait(30):
            raise RuntimeError("the test never released the render")
        g = GaugeMetricFamily("slow_value", "a value", labels=["i"])
        for i in range(self.series):
            g.add_metric([str(i)], float(i))
        yield g


def endpoint(series: int = 10, gated: bool = False, **stats: Any) -> tuple[Endpoint, SlowCollector]:
    reg = CollectorRegistry()
    slow = SlowCollector(series, gated)
    reg.register(slow)  # before the endpoint's own counters: a render collects them after this one
    cfg = config.parse({"stats": {"port": 0, **stats}}).stats
    return Endpoint(cfg, reg), slow


def get(port: int, path: str = "/metrics", timeout: float = 10) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]) if head else 0, body, time.monotonic() - t0


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> bool:
    """Polls ``condition`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), None if it stayed open."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_default_bind_is_loopback():
    assert config.Config().stats.address == "127.0.0.1"


def test_concurrent_scrapes_share_one_render_and_extra_ones_get_503_at_once():
    ep, slow = endpoint(gated=True, maxConcurrentScrapes=3, renderIntervalSeconds=60)
    try:
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            try:
                scrapes = [pool.submit(get, ep.port, timeout=30) for _ in range(10)]
                # The render is held: three scrapes wait for it, the other seven are answered
                # without waiting for it (at once: the render cannot finish first).
                answered = wait_until(lambda: sum(f.done() for f in scrapes) == 7 and ep.scrapes == 3)
                refused = [f.result()[0] for f in scrapes if f.done()]
                assert answered and refused == [503] * 7, (refused, ep.scrapes)
                held = [f for f in scrapes if not f.done()]
            finally:
                slow.release()
            ok = [f.result() for f in held]
        assert [code for code, _, _ in ok] == [200] * 3
        assert len({body for _, body, _ in ok}) == 1 and b'slow_value{i="9"} 9.0' in ok[0][1]
        assert slow.calls == 1  # one render for the three scrapes
        code, body, _ = get(ep.port)  # within renderIntervalSeconds: the same bytes, no render
        assert code == 200 and body == ok[0][1] and slow.calls == 1
        # The render collected the endpoint's counters after the seven refusals (it was held).
        assert b'extproc_metrics_rejected_total{reason="busy"} 7.0' in body
    finally:
        slow.release()
        ep.close()


def test_render_interval_zero_renders_every_scrape():
    ep, slow = endpoint(renderIntervalSeconds=0)
    try:
        for _ in range(3):
            assert get(ep.port)[0] == 200
        assert slow.calls == 3
    finally:
        ep.close()


def test_idle_and_half_sent_requests_are_closed_without_rendering():
    ep, slow = endpoint(readTimeoutSeconds=0.5)
    try:
        idle = socket.create_connection(("127.0.0.1", ep.port))
        half = socket.create_connection(("127.0.0.1", ep.port))
        half.sendall(b"GET /metrics HTTP/1.1\r\n")  # the request line, then nothing
        drip = socket.create_connection(("127.0.0.1", ep.port))
        drip.sendall(b"GET /metrics HTTP/1.1\r\n")
        for _ in range(2):  # a header byte now and then does not extend the deadline
            time.sleep(0.2)
            drip.sendall(b"X")
        for s in (idle, half, drip):
            took = closed_within(s, 3)
            assert took is not None and took < 1.5
            s.close()
        assert slow.calls == 0  # nothing rendered for requests that never completed
        half_closed = socket.create_connection(("127.0.0.1", ep.port))
        half_closed.sendall(b"GET /metrics HTTP/1.1\r\n")
        half_closed.shutdown(socket.SHUT_WR)  # abandoned after its request line
        assert closed_within(half_closed, 3) is not None
        half_closed.close()
        assert slow.calls == 0
        assert get(ep.port)[0] == 200 and slow.calls == 1
    finally:
        ep.close()


def test_at_the_cap_a_new_connection_evicts_the_oldest_idle_one():
    ep, slow = endpoint(maxConnections=3, readTimeoutSeconds=30)
    held = []
    try:
        for _ in range(3):
            held.append(socket.create_connection(("127.0.0.1", ep.port)))
            time.sleep(0.05)  # an order the server sees
        time.sleep(0.2)
        code, _, _ = get(ep.port)  # a scrape over the cap: the oldest idle connection makes room
        closed = [closed_within(held[0], 2), closed_within(held[1], 0.3), closed_within(held[2], 0.3)]
        rejected = dict(ep.rejected)
    finally:
        for s in held:
            s.close()
        ep.close()
    assert code == 200
    assert closed[0] is not None and closed[0] < 0.5 and closed[1:] == [None, None]
    assert rejected == {"evicted": 1}


def test_at_the_cap_with_every_connection_waiting_for_a_render_a_new_one_is_closed_at_once():
    # readTimeoutSeconds=30: a connection closed well before that was refused, not timed out.
    ep, slow = endpoint(gated=True, maxConnections=2, maxConcurrentScrapes=4, readTimeoutSeconds=30)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            try:
                scrapes = [pool.submit(get, ep.port, timeout=30) for _ in range(2)]
                assert wait_until(lambda: ep.scrapes == 2)  # both wait for the held render: not evictable
                extra = socket.create_connection(("127.0.0.1", ep.port))
                took = closed_within(extra, 10)
                extra.close()
                # closed while the render is still held (at once, not after it), and refused:
                assert took is not None and not any(f.done() for f in scrapes)
                assert ep.rejected == {"connections": 1}
            finally:
                slow.release()
            assert [f.result()[0] for f in scrapes] == [200, 200]
        assert ep.rejected == {"connections": 1}
    finally:
        slow.release()
        ep.close()


def test_scrapes_keep_working_while_connections_are_held_and_reopened():
    """An adversary holds every connection slot, idle or as a request that never reads its
    answer, and re-opens each as soon as the server closes it: every scrape still succeeds."""
    ep, slow = endpoint(series=20_000, readTimeoutSeconds=2)
    stop = threading.Event()
    opened = [0]

    def hold(slots: int, request: bytes) -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            while len(socks) < slots:
                s = socket.create_connection(("127.0.0.1", ep.port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                if request:
                    s.sendall(request)  # and never read the answer
                s.setblocking(False)
                socks.append(s)
                opened[0] += 1
            for s in list(socks):  # re-open what the server closed
                try:
                    data = s.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    continue  # open, nothing sent
                except OSError:
                    data = b""  # reset
                if data:
                    continue  # an answer waiting, never read: still held
                socks.remove(s)
                s.close()
            time.sleep(0.005)
        for s in socks:
            s.close()

    holders = [
        threading.Thread(target=hold, args=(64, b"")),
        threading.Thread(target=hold, args=(2, b"GET /metrics HTTP/1.1\r\n\r\n")),
    ]  # within the scrape slots
    codes: list[int | str] = []
    try:
        for t in holders:
            t.start()
        time.sleep(0.5)
        for _ in range(40):
            try:
                codes.append(get(ep.port, timeout=5)[0])
            except OSError as e:
                codes.append(type(e).__name__)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in holders:
            t.join(10)
        ep.close()
    assert codes == [200] * 40
    assert opened[0] > 66  # the slots were held and re-opened


def test_healthz_404_and_bad_requests():
    ep, _ = endpoint()
    try:
        assert get(ep.port, "/healthz")[:2] == (200, b"ok\n")
        assert get(ep.port, "/nope")[0] == 404
        with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as s:
            s.sendall(b"GET /metrics\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n")
            assert closed_within(s, 3) is not None  # a head over 16 KiB: dropped
    finally:
        ep.close()


def test_a_reader_that_never_reads_is_dropped_after_the_write_timeout():
    ep, _ = endpoint(series=200_000, writeTimeoutSeconds=0.5)
    try:
        s = socket.create_connection(("127.0.0.1", ep.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + 15
        while ep.rejected.get("write_timeout", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ep.rejected.get("write_timeout") == 1
        assert ep.connections == 0 and ep.scrapes == 0
        s.close()
    finally:
        ep.close()


@pytest.mark.parametrize("key,value", [("maxConcurrentScrapes", 0), ("readTimeoutSeconds", 0), ("maxConnections", 0)])
def test_bad_endpoint_settings_name_the_key(key, value):
    with pytest.raises(config.ConfigError, match=f"stats.{key}"):
        config.parse({"stats": {key: value}})
