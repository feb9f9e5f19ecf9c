"""Heartbeats: the server's ServerInfo, POSTed to every gateway's registry every interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from shared.records import ServerInfo, ServerState

log = logging.getLogger(__name__)


async def announce(client: httpx.AsyncClient, gateways: list[str], info: ServerInfo) -> None:
    """Send one heartbeat to every gateway; a gateway that does not answer is logged, not fatal."""
    payload = info.model_dump(mode="json")

    async def send(url: str) -> None:
        try:
            response = await client.post(f"{url}/registry/heartbeat", json=payload)
            if response.status_code != 200:
                log.warning("gateway %s refused the heartbeat: %s %s", url, response.status_code, response.text[:200])
        except httpx.HTTPError as exc:
            log.warning("gateway %s unreachable: %s", url, type(exc).__name__)

    await asyncio.gather(*(send(url) for url in gateways))


async def heartbeat_loop(gateways: list[str], current: Callable[[], ServerInfo], interval_s: float) -> None:
    """Announce `current()` every `interval_s` until cancelled; then announce `offline` once."""
    async with httpx.AsyncClient(timeout=max(1.0, interval_s)) as client:
        try:
            while True:
                await announce(client, gateways, current())
                await asyncio.sleep(interval_s)
        finally:
            offline = current().model_copy(update={"state": ServerState.offline})
            await asyncio.shield(announce(client, gateways, offline))
