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
from shared.errors import BadRequest, CorollaError, ProtocolError, SessionLost, Unavailable
from shared.protocol import Message

log = logging.getLogger(__name__)

MAX_BATCH = 256


class SessionHandler:
    def __init__(self, service, settings):
        # the Blockserver: its `runtime` (None while loading or moving) and `model_name`
        self.service = service
        self.settings = settings

    async def serve(self, ws: WebSocket) -> None:
        await ws.accept()
        session: Session | None = None
        runtime: Runtime | None = None  # the one the session was opened on
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
                    if session is None:
                        runtime = self.service.runtime  # changes when the server moves
                        if runtime is None:
                            raise Unavailable("this server is loading or moving; try another")
                    reply, session = await self._handle(runtime, message, session)
                except CorollaError as exc:
                    reply = protocol.error_frame(exc.code, exc.message)
                await ws.send_bytes(reply)
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                await runtime.close(session.session_id)

    async def _handle(self, runtime: Runtime, message: Message, session: Session | None) -> tuple[bytes, Session | None]:
        dtype = runtime.span.dtype
        if message.type == "open":
            if session is not None:
                raise BadRequest("this socket already has a session open")
            session = await self._open(runtime, message)
            return protocol.encode("ready", session_id=session.session_id, position=0), session
        if message.type == "step":
            if session is None:
                raise BadRequest("send `open` before `step`")
            return await self._step(runtime, message, session), session
        if message.type == "forward":
            hidden = self._hidden(runtime, message, batch_size=None, room=_context(runtime))
            mask = self._mask(message, hidden)
            out = await runtime.forward(hidden, mask)
            return protocol.encode("result", {"hidden": out.to(dtype)}), session
        raise BadRequest(f"a blockserver does not accept {message.type!r} messages")

    async def _open(self, runtime: Runtime, message: Message) -> Session:
        span = runtime.span
        dtype_name = protocol.DTYPE_NAMES[span.dtype]
        session_id, model = message.get("session_id"), message.get("model")
        start_end = message.get("span")
        batch_size, max_length = message.get("batch_size", 1), message.get("max_length")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 128:
            raise BadRequest("open needs a session_id string of 1-128 characters")
        if model != self.service.model_name:
            raise BadRequest(f"this server serves {self.service.model_name!r}, not {model!r}")
        if (not isinstance(start_end, list) or len(start_end) != 2 or not all(_is_int(x) for x in start_end)
                or not span.start <= start_end[0] < start_end[1] <= span.end):
            raise BadRequest(f"span must be [start, end) within this server's layers [{span.start}, {span.end}), "
                             f"got {start_end!r}")
        if not _is_int(batch_size) or not 1 <= batch_size <= MAX_BATCH:
            raise BadRequest(f"batch_size must be an integer in [1, {MAX_BATCH}]")
        if not _is_int(max_length) or not 1 <= max_length <= _context(runtime):
            raise BadRequest(f"max_length must be an integer in [1, {_context(runtime)}]")
        if message.get("dtype", dtype_name) != dtype_name:
            raise BadRequest(f"this server computes in {dtype_name}")
        return await runtime.open(session_id, batch_size, max_length, self.settings.alloc_timeout_s,
                                       start_end[0], start_end[1])

    async def _step(self, runtime: Runtime, message: Message, session: Session) -> bytes:
        if session.session_id not in runtime.sessions:
            raise SessionLost("this server dropped the session (it is moving to other layers)")
        position = message.get("position")
        if not _is_int(position) or not 0 <= position <= session.cache.length:
            raise BadRequest(f"position {position!r} is beyond the {session.cache.length} tokens this "
                             f"session holds")
        hidden = self._hidden(runtime, message, session.batch_size, room=session.max_length - position)
        mask = self._mask(message, hidden)
        hypo_ids = message.tensors.get("hypo_ids")
        if hypo_ids is not None and (hypo_ids.dtype != torch.int64 or hypo_ids.shape != (session.batch_size,)):
            raise BadRequest(f"hypo_ids must be int64 [{session.batch_size}]")
        out = await runtime.step(session, position, hidden, mask, hypo_ids)
        return protocol.encode("result", {"hidden": out}, step_id=message.get("step_id"),
                               position=session.cache.length)

    @staticmethod
    def _hidden(runtime: Runtime, message: Message, batch_size: int | None, room: int) -> torch.Tensor:
        hidden = message.tensors.get("hidden")
        size, dtype = runtime.span.hidden_size, runtime.span.dtype
        if hidden is None:
            raise BadRequest("message carries no `hidden` tensor")
        if hidden.dtype != dtype:
            raise BadRequest(f"hidden must be {protocol.DTYPE_NAMES[dtype]}, got {protocol.DTYPE_NAMES[hidden.dtype]}")
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


def _context(runtime: Runtime) -> int:
    return runtime.span.config.max_position_embeddings


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
