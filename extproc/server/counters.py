"""What one worker counts about its streams, in one place: the gRPC server, the drain, the
memory trimmer and the tests read these (per process; the metrics observers count calls)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from extproc.server.memory import TRIM_AFTER_BYTES


@dataclass(slots=True)
class WorkerCounters:
    active: int = 0  # streams in flight (the drain waits for 0)
    internal_errors: int = 0  # bugs caught on a payload or in an observer (fail open, logged)
    bad_streams: int = 0  # streams ended for malformed gRPC input (see message_buffer.BadStream)
    held: int = 0  # bytes held by the parsers of all streams (limits.maxHeldBytes)
    large: int = 0  # bytes held at peaks / received in large messages since the last trim
    abandoned: dict[str, int] = field(default_factory=dict)  # streams whose parsing was abandoned, by reason
    refused: dict[str, int] = field(default_factory=dict)  # streams refused as they opened, by reason
    trim_wanted: asyncio.Event = field(default_factory=asyncio.Event)  # wakes the memory trimmer (set by large_seen)

    def large_seen(self) -> None:
        """``large`` grew: from ``TRIM_AFTER_BYTES`` on, the trimmer starts looking (it sleeps until then)."""
        if self.large >= TRIM_AFTER_BYTES:
            self.trim_wanted.set()

    def trim_due(self) -> bool:
        """True (once) if large buffers were used and released since the last call (see
        :mod:`extproc.server.memory`)."""
        if self.large >= TRIM_AFTER_BYTES and self.held < self.large // 2:
            self.large = 0
            return True
        return False
