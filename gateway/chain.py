"""A chain session: one WebSocket session per blockserver of the chain, driven step by step.

The gateway keeps, per span, every input it sent (the client-side half of the paper's dual
attention caches), so that a replacement server can be rebuilt by replaying them."""

from __future__ import annotations

import asyncio
import logging
import uuid

import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from shared import protocol
from shared.errors import BadRequest, CacheFull, ProtocolError, SessionLost, Unavailable
from shared.records import ServerInfo

log = logging.getLogger(__name__)

ERRORS_BY_CODE = {"cache_full": CacheFull, "bad_request": BadRequest, "protocol_error": ProtocolError}


class RemoteSpan:
    """One session on one blockserver."""

    def __init__(self, server: ServerInfo, session_id: str, timeouts: tuple[float, float], max_frame_bytes: int):
        self.server = server
        self.session_id = session_id
        self.connect_timeout_s, self.step_timeout_s = timeouts
        self.max_frame_bytes = max_frame_bytes
        self.ws: ClientConnection | None = None
        self.dtype = protocol.WIRE_DTYPES.get(server.dtype, torch.float32)
        self.position = 0
        self.history: list[torch.Tensor] = []  # inputs sent, for replay on failover

    @property
    def ws_url(self) -> str:
        return self.server.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"

    async def open(self, model: str, batch_size: int, max_length: int) -> None:
        try:
            self.ws = await asyncio.wait_for(
                connect(self.ws_url, compression=None, max_size=self.max_frame_bytes, open_timeout=self.connect_timeout_s),
                self.connect_timeout_s)
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise SessionLost(f"cannot connect to {self.server.server_id} at {self.server.url}: {exc}") from exc
        await self._call(protocol.encode("open", session_id=self.session_id, model=model,
                                         span=[self.server.start, self.server.end], batch_size=batch_size,
                                         max_length=max_length, dtype=self.server.dtype), "ready")

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: [batch, tokens, hidden] -> the span's output, same shape."""
        tensors = {"hidden": hidden.to(self.dtype)}
        if mask is not None:
            tensors["mask"] = mask
        reply = await self._call(protocol.encode("step", tensors, step_id=len(self.history), position=self.position),
                                 "result")
        self.history.append(hidden)
        self.position += hidden.shape[1]
        return reply.tensors["hidden"]

    async def _call(self, frame: bytes, expected: str) -> protocol.Message:
        try:
            await self.ws.send(frame)
            data = await asyncio.wait_for(self.ws.recv(), self.step_timeout_s)
        except TimeoutError as exc:
            raise SessionLost(f"{self.server.server_id} gave no reply within {self.step_timeout_s}s") from exc
        except (OSError, WebSocketException) as exc:
            raise SessionLost(f"{self.server.server_id} dropped the session: {exc}") from exc
        message = protocol.decode(data, self.max_frame_bytes)
        if message.type == "error":
            error = ERRORS_BY_CODE.get(message.get("code"), Unavailable)
            raise error(f"{self.server.server_id}: {message.get('message')}")
        if message.type != expected:
            raise ProtocolError(f"{self.server.server_id} answered {message.type!r} to a request for {expected!r}")
        return message

    async def close(self) -> None:
        if self.ws is None:
            return
        try:
            await asyncio.wait_for(self.ws.send(protocol.encode("close")), 1.0)
        except (OSError, TimeoutError, WebSocketException):
            pass
        await self.ws.close()


class ChainSession:
    """A generation's sessions on every span of its chain, opened together, closed together."""

    def __init__(self, chain: list[ServerInfo], model: str, batch_size: int, max_length: int, settings):
        session_id = f"sess-{uuid.uuid4().hex[:12]}"
        timeouts = (settings.connect_timeout_s, settings.step_timeout_s)
        self.spans = [RemoteSpan(s, session_id, timeouts, settings.max_frame_bytes) for s in chain]
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.session_id = session_id

    async def __aenter__(self) -> ChainSession:
        try:
            await asyncio.gather(*(s.open(self.model, self.batch_size, self.max_length) for s in self.spans))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for span in self.spans:
            hidden = await span.step(hidden, mask)
        return hidden

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.spans), return_exceptions=True)
