"""The WebSocket session endpoint: validates every message, then hands work to the runtime.

Frames are typed and validated by `shared.protocol.decode`; what depends on this server (its
model, its layers, the session's room) is checked here. A bad message gets an error frame and
changes nothing; the socket and every other session go on. A session's cache is freed when it
closes, when its socket drops, or after `idle_timeout_s`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Protocol

import torch
from starlette.websockets import WebSocket, WebSocketDisconnect

from blockserver.runtime import Runtime, Session
from blockserver.settings import BlockserverSettings
from shared import protocol
from shared.errors import (
    BadRequest,
    CorollaError,
    ModelMismatch,
    Overloaded,
    ProtocolError,
    SessionExpired,
    SessionLost,
    Unauthorized,
    Unavailable,
)
from shared.identity import GRANT, STATELESS, AuthError, verify
from shared.protocol import Backward, Close, Forward, Message, Open, Ready, Result, Step


class Host(Protocol):
    """What the handler needs of the blockserver: its runtime (None while loading or moving) and
    the model it serves."""

    runtime: Runtime | None
    model_name: str
    server_id: str

    @property
    def fingerprint(self) -> str: ...

    def trusted_gateways(self) -> set[str] | None: ...


log = logging.getLogger(__name__)


class SessionHandler:
    def __init__(self, host: Host, settings: BlockserverSettings):
        self.host, self.settings = host, settings
        self.per_peer: Counter[str] = Counter()  # open sessions by the peer's address

    async def serve(self, ws: WebSocket) -> None:
        await ws.accept()
        peer = ws.client.host if ws.client else "?"
        session: Session | None = None
        runtime: Runtime | None = None  # the one the session was opened on
        last_work = time.monotonic()  # only valid work keeps a socket alive: junk frames do not
        try:
            while True:
                try:
                    left = self.settings.idle_timeout_s - (time.monotonic() - last_work)
                    if left <= 0:
                        raise TimeoutError
                    frame = await asyncio.wait_for(ws.receive(), left)
                except TimeoutError:
                    await ws.send_bytes(protocol.error_frame(SessionExpired.code, "session idle for too long; freed"))
                    await ws.close()
                    return
                if frame["type"] == "websocket.disconnect":
                    return
                data = frame.get("bytes")
                try:
                    if data is None:
                        raise ProtocolError("frames must be binary")
                    message = protocol.decode(data, self.settings.max_frame_bytes)
                    if isinstance(message.header, Close):
                        await ws.close()
                        return
                    if session is None:
                        runtime = self.host.runtime  # changes when the server moves
                        if runtime is None:
                            raise Unavailable("this server is loading or moving; try another")
                    opening = session is None and isinstance(message.header, Open)
                    if opening and self.per_peer[peer] >= self.settings.max_sessions_per_peer:
                        raise Overloaded(f"{self.settings.max_sessions_per_peer} sessions from this address are open "
                                         f"here already")
                    reply, session = await self._handle(runtime, message, session)
                    if opening and session is not None:
                        self.per_peer[peer] += 1
                    last_work = time.monotonic()
                except CorollaError as exc:
                    reply = protocol.error_frame(exc.code, exc.message)
                except Exception:  # a bug must cost one frame, not the socket and its session
                    log.exception("unexpected error handling a frame")
                    reply = protocol.error_frame(CorollaError.code, "internal error handling this frame")
                await ws.send_bytes(reply)
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                self.per_peer[peer] -= 1
                if self.per_peer[peer] <= 0:
                    del self.per_peer[peer]
                await runtime.close(session.session_id)

    async def _handle(self, runtime: Runtime, message: Message, session: Session | None) -> tuple[bytes, Session | None]:
        match message.header:
            case Open() as header:
                if session is not None:
                    raise BadRequest("this socket already has a session open")
                session = await self._open(runtime, header)
                session.wire = header.wire
                return protocol.encode(Ready(session_id=session.session_id)), session
            case Step() as header:
                if session is None:
                    raise BadRequest("send `open` before `step`")
                return await self._step(runtime, header, message.tensors, session), session
            case Forward() | Backward() as header:
                self._check_grant(header.grant, STATELESS)
                self._check_model(header.model)
                start, end = self._layers(runtime, header.span)
                hidden = self._hidden(runtime, message.tensors, batch_size=None, room=runtime.layers.context_length)
                mask = self._mask(message.tensors, hidden)
                prompts = self._prompts(runtime, message.tensors, end - start, hidden.shape[1])
                if isinstance(header, Forward):
                    out = await runtime.forward(hidden, mask, prompts, start, end)
                    return protocol.encode(Result(), {"hidden": out.to(runtime.layers.dtype)}, header.wire), session
                grad = message.tensors["grad"]
                if grad.shape != hidden.shape or grad.dtype != hidden.dtype:
                    raise BadRequest(f"grad must be like hidden: {list(hidden.shape)} {runtime.layers.dtype_name}")
                grad_in, grad_prompts = await runtime.backward(hidden, grad, mask, prompts, start, end)
                tensors = {"grad": grad_in.to(runtime.layers.dtype)}
                if grad_prompts is not None:
                    tensors["grad_prompts"] = grad_prompts.to(runtime.layers.dtype)
                return protocol.encode(Result(), tensors), session
        raise BadRequest(f"a blockserver does not accept {message.type!r} messages")

    def _check_model(self, fingerprint: str) -> None:
        if fingerprint != self.host.fingerprint:
            raise ModelMismatch(f"this server serves {self.host.model_name} (fingerprint {self.host.fingerprint}), "
                                f"not the model with fingerprint {fingerprint}")

    def _check_grant(self, grant: dict | None, session_id: str) -> None:
        """A session (or a stateless pass: STATELESS) must come with a fresh grant for this server,
        signed by a gateway it heartbeats to."""
        trusted = self.host.trusted_gateways()
        if trusted is None:
            return
        if grant is None:
            raise Unauthorized("this server serves only sessions granted by its gateways (no grant)")
        try:
            body = verify(grant, GRANT, trusted=trusted, prefix="gw").body
        except AuthError as exc:
            raise Unauthorized(f"grant refused: {exc}") from None
        if body.get("server") != self.host.server_id or body.get("session") != session_id:
            raise Unauthorized("grant refused: it is for another server or session")

    async def _open(self, runtime: Runtime, header: Open) -> Session:
        layers = runtime.layers
        self._check_grant(header.grant, header.session_id)
        self._check_model(header.model)
        start, end = self._layers(runtime, header.span)
        if header.max_length > layers.context_length:
            raise BadRequest(f"max_length must be at most the model's context, {layers.context_length}")
        if header.dtype != layers.dtype_name:
            raise BadRequest(f"this server computes in {layers.dtype_name}")
        return await runtime.open(header.session_id, header.batch_size, header.max_length, start, end,
                                  header.reserve_length)

    @staticmethod
    def _layers(runtime: Runtime, span: list[int]) -> tuple[int, int]:
        layers = runtime.layers
        start, end = span
        if not layers.start <= start < end <= layers.end:
            raise BadRequest(f"span must be [start, end) within this server's layers [{layers.start}, {layers.end}), "
                             f"got {span!r}")
        return start, end

    async def _step(self, runtime: Runtime, header: Step, tensors: dict, session: Session) -> bytes:
        if runtime.sessions.get(session.session_id) is not session:
            raise SessionLost("this server dropped the session (it is moving to other layers)")
        if header.position > session.cache.length:
            raise BadRequest(f"position {header.position} is beyond the {session.cache.length} tokens this "
                             f"session holds")
        hidden = self._hidden(runtime, tensors, session.batch_size, room=session.max_length - header.position)
        mask = self._mask(tensors, hidden)
        hypo_ids = tensors.get("hypo_ids")
        if hypo_ids is not None and (hypo_ids.dtype != torch.int64 or hypo_ids.shape != (session.batch_size,)):
            raise BadRequest(f"hypo_ids must be int64 [{session.batch_size}]")
        prompts = self._prompts(runtime, tensors, session.end - session.start, runtime.layers.context_length)
        def reply(out: torch.Tensor) -> bytes:  # on the compute thread, right after the step
            return protocol.encode(Result(step_id=header.step_id, position=session.cache.length), {"hidden": out},
                                   session.wire)
        return await runtime.step(session, header.position, hidden, mask, hypo_ids, prompts, reply)

    @staticmethod
    def _hidden(runtime: Runtime, tensors: dict, batch_size: int | None, room: int) -> torch.Tensor:
        hidden = tensors["hidden"]
        size, dtype = runtime.layers.hidden_size, runtime.layers.dtype
        if hidden.dtype != dtype:
            raise BadRequest(f"hidden must be {runtime.layers.dtype_name}, got {protocol.WIRE_DTYPE_NAMES[hidden.dtype]}")
        if hidden.dim() != 3 or hidden.shape[2] != size or (batch_size is not None and hidden.shape[0] != batch_size):
            raise BadRequest(f"hidden must be [{batch_size or 'batch'}, tokens, {size}], got {list(hidden.shape)}")
        if not 1 <= hidden.shape[1] <= room:
            raise BadRequest(f"a step of {hidden.shape[1]} tokens does not fit: {room} tokens of room left")
        if hidden.shape[0] > protocol.MAX_BATCH:
            raise BadRequest(f"batch larger than {protocol.MAX_BATCH}")
        return hidden

    @staticmethod
    def _prompts(runtime: Runtime, tensors: dict, layers: int, max_tokens: int) -> torch.Tensor | None:
        prompts = tensors.get("prompts")
        if prompts is None:
            return None
        size, dtype = runtime.layers.hidden_size, runtime.layers.dtype
        if (prompts.dtype != dtype or prompts.dim() != 3 or prompts.shape[0] != layers or prompts.shape[2] != size
                or not 1 <= prompts.shape[1] <= max_tokens):
            raise BadRequest(f"prompts must be {runtime.layers.dtype_name} [{layers}, tokens (1..{max_tokens}), "
                             f"{size}], got {protocol.WIRE_DTYPE_NAMES[prompts.dtype]} {list(prompts.shape)}")
        return prompts

    @staticmethod
    def _mask(tensors: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        mask = tensors.get("mask")
        if mask is not None and (mask.shape != hidden.shape[:2] or mask.dtype not in (torch.int64, torch.bool)):
            raise BadRequest(f"mask must be int64 or bool {list(hidden.shape[:2])}")
        return mask
