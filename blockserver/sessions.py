"""The WebSocket session endpoint: validates every message, then hands work to the runtime.

A bad message gets an error frame and changes nothing; the socket and every other session go on.
A session's cache is freed when it closes, when its socket drops, or after `idle_timeout_s`."""

from __future__ import annotations

import asyncio
import logging

import torch
from starlette.websockets import WebSocket, WebSocketDisconnect

from blockserver.runtime import Runtime, Session
from shared import protocol
from shared.errors import BadRequest, CorollaError, ProtocolError
from shared.protocol import Message

log = logging.getLogger(__name__)

MAX_BATCH = 256


class SessionHandler:
    def __init__(self, runtime: Runtime, model_name: str, dtype: torch.dtype, settings):
        self.runtime = runtime
        self.model_name = model_name
        self.dtype = dtype
        self.settings = settings
        self.max_length = runtime.span.config.max_position_embeddings

    async def serve(self, ws: WebSocket) -> None:
        await ws.accept()
        session: Session | None = None
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(ws.receive(), self.settings.idle_timeout_s)
                except TimeoutError:
                    await ws.send_bytes(protocol.error_frame("idle_timeout", "session idle for too long; freed"))
                    await ws.close()
                    return
                if frame["type"] == "websocket.disconnect":
                    return
                data = frame.get("bytes")
                try:
                    if data is None:
                        raise ProtocolError("frames must be binary")
                    message = protocol.decode(data, self.settings.max_frame_bytes)
                    if message.type == "close":
                        await ws.close()
                        return
                    reply, session = await self._handle(message, session)
                except CorollaError as exc:
                    reply = protocol.error_frame(exc.code, exc.message)
                await ws.send_bytes(reply)
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                await self.runtime.close(session.session_id)

    async def _handle(self, message: Message, session: Session | None) -> tuple[bytes, Session | None]:
        if message.type == "open":
            if session is not None:
                raise BadRequest("this socket already has a session open")
            session = await self._open(message)
            return protocol.encode("ready", session_id=session.session_id, position=0), session
        if message.type == "step":
            if session is None:
                raise BadRequest("send `open` before `step`")
            return await self._step(message, session), session
        if message.type == "forward":
            hidden = self._hidden(message, batch_size=None, room=self.max_length)
            mask = self._mask(message, hidden)
            out = await self.runtime.forward(hidden, mask)
            return protocol.encode("result", {"hidden": out.to(self.dtype)}), session
        raise BadRequest(f"a blockserver does not accept {message.type!r} messages")

    async def _open(self, message: Message) -> Session:
        span = self.runtime.span
        session_id, model = message.get("session_id"), message.get("model")
        start_end = message.get("span")
        batch_size, max_length = message.get("batch_size", 1), message.get("max_length")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 128:
            raise BadRequest("open needs a session_id string of 1-128 characters")
        if model != self.model_name:
            raise BadRequest(f"this server serves {self.model_name!r}, not {model!r}")
        if (not isinstance(start_end, list) or len(start_end) != 2 or not all(_is_int(x) for x in start_end)
                or not span.start <= start_end[0] < start_end[1] <= span.end):
            raise BadRequest(f"span must be [start, end) within this server's layers [{span.start}, {span.end}), "
                             f"got {start_end!r}")
        if not _is_int(batch_size) or not 1 <= batch_size <= MAX_BATCH:
            raise BadRequest(f"batch_size must be an integer in [1, {MAX_BATCH}]")
        if not _is_int(max_length) or not 1 <= max_length <= self.max_length:
            raise BadRequest(f"max_length must be an integer in [1, {self.max_length}]")
        if message.get("dtype", protocol.DTYPE_NAMES[self.dtype]) != protocol.DTYPE_NAMES[self.dtype]:
            raise BadRequest(f"this server computes in {protocol.DTYPE_NAMES[self.dtype]}")
        return await self.runtime.open(session_id, batch_size, max_length, self.settings.alloc_timeout_s,
                                       start_end[0], start_end[1])

    async def _step(self, message: Message, session: Session) -> bytes:
        position = message.get("position")
        if not _is_int(position) or not 0 <= position <= session.cache.length:
            raise BadRequest(f"position {position!r} is beyond the {session.cache.length} tokens this "
                             f"session holds")
        hidden = self._hidden(message, session.batch_size, room=session.max_length - position)
        mask = self._mask(message, hidden)
        hypo_ids = message.tensors.get("hypo_ids")
        if hypo_ids is not None and (hypo_ids.dtype != torch.int64 or hypo_ids.shape != (session.batch_size,)):
            raise BadRequest(f"hypo_ids must be int64 [{session.batch_size}]")
        out = await self.runtime.step(session, position, hidden, mask, hypo_ids)
        return protocol.encode("result", {"hidden": out.to(self.dtype)}, step_id=message.get("step_id"),
                               position=session.cache.length)

    def _hidden(self, message: Message, batch_size: int | None, room: int) -> torch.Tensor:
        hidden = message.tensors.get("hidden")
        size = self.runtime.span.hidden_size
        if hidden is None:
            raise BadRequest("message carries no `hidden` tensor")
        if hidden.dtype != self.dtype:
            raise BadRequest(f"hidden must be {protocol.DTYPE_NAMES[self.dtype]}, got {protocol.DTYPE_NAMES[hidden.dtype]}")
        if hidden.dim() != 3 or hidden.shape[2] != size or (batch_size is not None and hidden.shape[0] != batch_size):
            raise BadRequest(f"hidden must be [{batch_size or 'batch'}, tokens, {size}], got {list(hidden.shape)}")
        if not 1 <= hidden.shape[1] <= room:
            raise BadRequest(f"a step of {hidden.shape[1]} tokens does not fit: {room} tokens of room left")
        if hidden.shape[0] > MAX_BATCH:
            raise BadRequest(f"batch larger than {MAX_BATCH}")
        return hidden

    @staticmethod
    def _mask(message: Message, hidden: torch.Tensor) -> torch.Tensor | None:
        mask = message.tensors.get("mask")
        if mask is not None and (mask.shape != hidden.shape[:2] or mask.dtype not in (torch.int64, torch.bool)):
            raise BadRequest(f"mask must be int64 or bool {list(hidden.shape[:2])}")
        return mask


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
