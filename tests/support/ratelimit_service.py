"""A rate limit service double: Envoy's ``envoy.service.ratelimit.v3.RateLimitService`` over gRPC,
in-process on 127.0.0.1, recording every ``ShouldRateLimit`` call.

It counts like envoyproxy/ratelimit: each descriptor adds its ``hits_addend`` (the request's
``hits_addend``, else 1, when unset) to its key's usage, and a descriptor is OVER_LIMIT when its
usage after the addition is above its limit. So a ``hits_addend: 0`` check is over the limit once
the usage already is. ``limits`` maps a descriptor's entries (``(("team", "dev"),)``) to a limit
per day; descriptors without one are never limited.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass

import grpc

from tests.support._pb import rls_pb2 as rls
from tests.support._pb import rls_pb2_grpc as rls_grpc

Key = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Hit:
    domain: str
    key: Key
    hits: int  # what this descriptor added (0: a check)
    explicit: bool  # the descriptor carried its own hits_addend


class RateLimitDouble(rls_grpc.RateLimitServiceServicer):
    def __init__(self, limits: dict[Key, int] | None = None) -> None:
        self.limits = dict(limits or {})
        self.usage: dict[Key, int] = defaultdict(int)
        self.calls: list[list[Hit]] = []  # one list per ShouldRateLimit, its descriptors in order
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        rls_grpc.add_RateLimitServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ShouldRateLimit(self, request: rls.RateLimitRequest, context: grpc.ServicerContext) -> rls.RateLimitResponse:
        reply = rls.RateLimitResponse(overall_code=rls.RateLimitResponse.OK)
        hits: list[Hit] = []
        with self._lock:
            for d in request.descriptors:
                key: Key = tuple((e.key, e.value) for e in d.entries)
                explicit = d.HasField("hits_addend")
                n = d.hits_addend.value if explicit else (request.hits_addend or 1)
                self.usage[key] += -n if d.is_negative_hits else n
                hits.append(Hit(request.domain, key, n, explicit))
                limit = self.limits.get(key)
                over = limit is not None and self.usage[key] > limit
                status = reply.statuses.add(code=rls.RateLimitResponse.OVER_LIMIT if over else rls.RateLimitResponse.OK)
                if limit is not None:
                    status.current_limit.requests_per_unit = limit
                    status.current_limit.unit = rls.RateLimitResponse.RateLimit.DAY
                    status.limit_remaining = max(0, limit - self.usage[key])
                    status.duration_until_reset.seconds = 3600
                if over:
                    reply.overall_code = rls.RateLimitResponse.OVER_LIMIT
            self.calls.append(hits)
        return reply

    # ---- what the tests read ------------------------------------------------------------------
    def hits(self) -> list[Hit]:
        with self._lock:
            return [h for call in self.calls for h in call]

    def charged(self, key: Key) -> int:
        """Everything added under ``key`` (the checks add 0)."""
        return sum(h.hits for h in self.hits() if h.key == key)

    def wait_charged(self, key: Key, want: int, timeout: float = 15.0, settle: float = 0.5) -> int:
        """Wait until ``key`` was charged ``want`` (charges come when streams are done, after the
        client has its response), then a little longer, so a charge too many would show."""
        deadline = time.monotonic() + timeout
        while self.charged(key) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(settle)
        return self.charged(key)

    def close(self) -> None:
        self.server.stop(grace=None).wait(5)
