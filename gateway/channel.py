"""The seam between a chain and its servers: a `Channel` carries frames to one blockserver.

`websocket_connect` is the real one. Tests connect chains to in-process blockservers (or to
servers that fail on purpose) through the same interface, so failover, bans and routing run
without sockets. Foreign exceptions become SessionLost here, at the boundary."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from shared.errors import SessionLost


class Channel(Protocol):
    async def send(self, frame: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None:
        """Close politely (may wait for the peer)."""

    def abort(self) -> None:
        """Drop the connection at once, without a handshake (a hung peer)."""


Connect = Callable[[str, float, int], Awaitable[Channel]]  # (server URL, timeout s, max frame bytes)


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"


class WebSocketChannel:
    def __init__(self, ws: ClientConnection, url: str):
        self._ws, self._url = ws, url

    async def send(self, frame: bytes) -> None:
        try:
            await self._ws.send(frame)
        except (OSError, WebSocketException) as exc:
            raise SessionLost(f"{self._url} dropped the session: {exc}") from exc

    async def recv(self) -> bytes:
        try:
            data = await self._ws.recv()
        except (OSError, WebSocketException) as exc:
            raise SessionLost(f"{self._url} dropped the session: {exc}") from exc
        return data if isinstance(data, bytes) else data.encode()

    async def close(self) -> None:
        try:
            await self._ws.close()
        except (OSError, WebSocketException):
            self.abort()

    def abort(self) -> None:
        if self._ws.transport is not None:
            self._ws.transport.abort()


async def websocket_connect(url: str, timeout_s: float, max_frame_bytes: int) -> Channel:
    try:
        ws = await connect(ws_url(url), compression=None, max_size=max_frame_bytes, open_timeout=timeout_s,
                           close_timeout=1)
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise SessionLost(f"cannot connect to {url}: {exc}") from exc
    return WebSocketChannel(ws, url)
