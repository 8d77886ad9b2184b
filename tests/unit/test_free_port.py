"""free_port: below the kernel's ephemeral range (where an outgoing connection could take the port
before the server binds it), free, and never handed out twice in one process."""

from __future__ import annotations

import socket

from extproc.devtools import dev


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [dev.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(dev._PORTS_LOW <= p < dev._ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        monkeypatch.setattr(dev, "_PORTS_LOW", taken)
        monkeypatch.setattr(dev, "_ephemeral_low", lambda: taken + 2000)
        picks = {dev.free_port() for _ in range(50)}
        assert taken not in picks
