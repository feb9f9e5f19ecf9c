"""Round-trip times to peers, averaged the same way wherever they are measured (gateway pings,
blockservers' next_pings)."""

from __future__ import annotations

import asyncio
import time

import httpx

EMA = 0.2  # weight of a new sample: smooth enough to ignore one slow reply, quick to follow a move


class RoundTrips:
    """Exponential moving averages of RTTs, in seconds, by server id."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, server_id: str, rtt_s: float) -> None:
        old = self.seconds.get(server_id)
        self.seconds[server_id] = rtt_s if old is None else EMA * rtt_s + (1 - EMA) * old

    def get(self, server_id: str) -> float | None:
        return self.seconds.get(server_id)

    def keep_only(self, live: set[str]) -> None:
        for gone in [k for k in self.seconds if k not in live]:
            del self.seconds[gone]

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
