"""A socket's place in tests that drive a server connection's protocol in process: what the
protocol writes is kept for the test to read as a client would, and no event loop is needed."""

from __future__ import annotations


class RecordingTransport:
    """An ``asyncio.Transport`` as far as the server's connection uses one: every write appended to
    ``written`` (a test may read and clear it between reads), ``closed`` once the protocol closes it."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default
