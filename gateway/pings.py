"""The gateway's round-trip times to each online server, measured in the background (EMA)."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from gateway.routing import Costs
from shared.records import ServerInfo

log = logging.getLogger(__name__)
EMA = 0.2  # weight of a new sample


async def ping_once(client: httpx.AsyncClient, servers: list[ServerInfo], costs: Costs,
                    forget_others: bool = True) -> None:
    async def ping(s: ServerInfo) -> None:
        started = time.perf_counter()
        try:
            await client.get(f"{s.url}/health", timeout=2.0)
        except httpx.HTTPError:
            return  # failures are the failover's business, not the RTT's
        rtt = time.perf_counter() - started
        old = costs.rtts.get(s.server_id)
        costs.rtts[s.server_id] = rtt if old is None else EMA * rtt + (1 - EMA) * old

    await asyncio.gather(*(ping(s) for s in servers))
    if not forget_others:
        return
    live = {s.server_id for s in servers}
    for gone in [k for k in costs.rtts if k not in live]:
        del costs.rtts[gone]


async def ping_new(server: ServerInfo, costs: Costs) -> None:
    """Measure a server as soon as it appears, so that routing does not guess for a period."""
    async with httpx.AsyncClient() as client:
        await ping_once(client, [server], costs, forget_others=False)


async def ping_loop(servers, costs: Costs, interval_s: float) -> None:
    """Ping every server `servers()` returns, every `interval_s`, until cancelled."""
    async with httpx.AsyncClient() as client:
        while True:
            await ping_once(client, servers(), costs)
            await asyncio.sleep(interval_s)
