"""Round-trip times to peers, averaged the same way wherever they are measured (gateway pings,
blockservers' next_pings)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import httpx

WINDOW = 8  # samples kept per peer: a move to a slower path shows after this many pings


class RoundTrips:
    """RTTs in seconds by server id: the minimum of each peer's last WINDOW samples.

    A ping's time is the path's delay plus queueing at both ends (a busy event loop, a compute
    thread holding the GIL); the minimum over a window keeps the path and drops the queueing,
    which routing counts separately as load. Averages let one busy moment make an equal replica
    look tens of milliseconds slower for many seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._samples: dict[str, deque[float]] = {}

    def add(self, server_id: str, rtt_s: float) -> None:
        samples = self._samples.setdefault(server_id, deque(maxlen=WINDOW))
        samples.append(rtt_s)
        self.seconds[server_id] = min(samples)

    def get(self, server_id: str) -> float | None:
        return self.seconds.get(server_id)

    def keep_only(self, live: set[str]) -> None:
        for gone in [k for k in self.seconds if k not in live]:
            del self.seconds[gone], self._samples[gone]

    async def measure(self, client: httpx.AsyncClient, targets: dict[str, str], timeout_s: float = 2.0) -> None:
        """GET `{url}/health` of each target {server_id: url} at once and record the round trips.
        Failures record nothing: they are the failover's business, not the RTT's."""

        async def ping(server_id: str, url: str) -> None:
            started = time.perf_counter()
            try:
                await client.get(f"{url}/health", timeout=timeout_s)
            except httpx.HTTPError:
                return
            self.add(server_id, time.perf_counter() - started)

        await asyncio.gather(*(ping(s, u) for s, u in targets.items()))
