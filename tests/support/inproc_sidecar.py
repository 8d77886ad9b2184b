"""The sidecar in this process (its own event loop thread), so tests can read its counters."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from extproc.core.call import CallObserver
from extproc.core.config import Config
from extproc.server.grpc_server import build_server
from extproc.server.processor import Processor


class InProcessSidecar:
    def __init__(self, config: Config, observers: Sequence[CallObserver], processor: type[Processor] = Processor) -> None:
        self.processor = processor(config, observers)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("in-process sidecar did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = build_server(self.processor, self.processor.settings.config.listen)
        self.loop.run_until_complete(self.server.start())
        self._started.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
