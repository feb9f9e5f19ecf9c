"""A chain session: one WebSocket session per hop of the chain, driven step by step, with failover.

The gateway keeps, per hop, every input it sent (the client-side half of the paper's dual
attention caches). When a server fails (socket closed, error frame, no reply within the step
timeout), it is banned, a replacement chain is routed for exactly that hop's layers (one server or
several, with boundaries of their own), opened at position 0, and fed the hop's whole input
history plus the input of the broken step. Only the last rows of its output go downstream: the
downstream servers already hold the earlier positions. Greedy output is unchanged."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from gateway.bans import Bans
from gateway.routing import Costs, Hop, route_chain
from shared import protocol
from shared.errors import BadRequest, CacheFull, ProtocolError, SessionLost, Unavailable
from shared.records import ServerInfo

log = logging.getLogger(__name__)

ERRORS_BY_CODE = {"cache_full": CacheFull, "bad_request": BadRequest, "protocol_error": ProtocolError}
# What a replacement can fix. BadRequest is not in it: the same input would fail anywhere.
RETRYABLE = (Unavailable, ProtocolError)


@dataclass
class FailoverStats:
    failures: int = 0  # hops that failed mid-session
    recoveries: int = 0  # failures repaired by a replacement
    given_up: int = 0  # failures with no replacement before the deadline


class RemoteSpan:
    """One session on one blockserver, running the hop's layers."""

    def __init__(self, hop: Hop, session_id: str, settings, load: dict[str, int]):
        self.server, self.span = hop.server, hop.span
        self._load = load  # this gateway's sessions per server, counted from routing to close
        load[self.server.server_id] = load.get(self.server.server_id, 0) + 1
        self._counted = True
        self.session_id = session_id
        self.connect_timeout_s, self.step_timeout_s = settings.connect_timeout_s, settings.step_timeout_s
        self.max_frame_bytes = settings.max_frame_bytes
        self.ws: ClientConnection | None = None
        self.dtype = protocol.WIRE_DTYPES.get(self.server.dtype, torch.float32)
        self.position = 0
        self.history: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (input, mask) of each step

    @property
    def ws_url(self) -> str:
        return self.server.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"

    async def open(self, model: str, batch_size: int, max_length: int) -> None:
        try:
            self.ws = await asyncio.wait_for(
                connect(self.ws_url, compression=None, max_size=self.max_frame_bytes, open_timeout=self.connect_timeout_s,
                        close_timeout=1), self.connect_timeout_s)
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise SessionLost(f"cannot connect to {self.server.server_id} at {self.server.url}: {exc}") from exc
        await self._call(protocol.encode("open", session_id=self.session_id, model=model,
                                         span=[self.span.start, self.span.end], batch_size=batch_size,
                                         max_length=max_length, dtype=self.server.dtype), "ready")

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: [batch, tokens, hidden] -> the hop's output, same shape."""
        tensors = {"hidden": hidden.to(self.dtype)}
        if mask is not None:
            tensors["mask"] = mask
        reply = await self._call(protocol.encode("step", tensors, step_id=len(self.history), position=self.position),
                                 "result")
        self.history.append((hidden, mask))
        self.position += hidden.shape[1]
        return reply.tensors["hidden"]

    async def _call(self, frame: bytes, expected: str) -> protocol.Message:
        try:
            await asyncio.wait_for(self.ws.send(frame), self.step_timeout_s)
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
        if self._counted:
            self._counted = False
            self._load[self.server.server_id] -= 1
        if self.ws is None:
            return
        try:
            await asyncio.wait_for(self.ws.send(protocol.encode("close")), 1.0)
        except (OSError, TimeoutError, WebSocketException):
            pass
        try:
            await asyncio.wait_for(self.ws.close(), 2.0)
        except (OSError, TimeoutError, WebSocketException):
            self.ws.transport.abort()  # a hung peer: drop the connection without a handshake


class ChainSession:
    """A generation's sessions on every hop of its chain, opened together, closed together."""

    def __init__(self, hops: list[Hop], model: str, num_layers: int, batch_size: int, max_length: int, settings,
                 servers: Callable[[], list[ServerInfo]], bans: Bans, stats: FailoverStats, costs: Costs):
        self.session_id = f"sess-{uuid.uuid4().hex[:12]}"
        self.costs = costs
        self.spans = [RemoteSpan(h, self.session_id, settings, costs.load) for h in hops]
        self.model, self.num_layers = model, num_layers
        self.batch_size, self.max_length = batch_size, max_length
        self.settings, self.servers, self.bans, self.stats = settings, servers, bans, stats
        self._orphans: set[asyncio.Task] = set()

    async def __aenter__(self) -> ChainSession:
        try:
            results = await asyncio.gather(*(s.open(self.model, self.batch_size, self.max_length) for s in self.spans),
                                           return_exceptions=True)
            for index in reversed(range(len(self.spans))):  # replace the hops that failed to open
                if isinstance(results[index], BaseException):
                    if not isinstance(results[index], RETRYABLE):
                        raise results[index]
                    self.spans[index:index + 1], _ = await self._replace(self.spans[index], results[index], None, None)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new positions through the whole chain. hidden: [batch, tokens, hidden]."""
        index = 0
        while index < len(self.spans):
            span = self.spans[index]
            try:
                out = await span.step(hidden, mask)
                index += 1
            except RETRYABLE as exc:
                replacement, out = await self._replace(span, exc, hidden, mask)
                self.spans[index:index + 1] = replacement
                index += len(replacement)
            hidden = out
        return hidden

    async def _replace(self, failed: RemoteSpan, error: Exception, hidden: torch.Tensor | None,
                       mask: torch.Tensor | None) -> tuple[list[RemoteSpan], torch.Tensor | None]:
        """Route, open and rebuild replacements for `failed`'s layers. Returns them and the output
        of the pending step `hidden` (the last rows of the replay), if there was one."""
        self.stats.failures += 1
        banned_for = self.bans.ban(failed.server.server_id)
        log.warning("session %s: %s (layers %s) failed at position %d: %s; banned for %.0fs, replacing",
                    self.session_id, failed.server.server_id, failed.span, failed.position, error, banned_for)
        self._discard(failed)
        if not self.settings.failover:
            self.stats.given_up += 1
            raise Unavailable(f"layers {failed.span} lost their server ({error}) and failover is off")
        history = failed.history + ([(hidden, mask)] if hidden is not None else [])
        replay, replay_mask = _concat(history)
        deadline = time.monotonic() + self.settings.failover_timeout_s
        while True:
            replacement: list[RemoteSpan] = []
            try:
                hops = route_chain(self.servers(), self.num_layers, self.bans.active(), start=failed.span.start,
                                   end=failed.span.end, costs=self.costs,
                                   cache_tokens=self.batch_size * self.max_length)
                replacement = [RemoteSpan(h, self.session_id, self.settings, self.costs.load) for h in hops]
                for span in replacement:
                    await self._guarded(span, span.open(self.model, self.batch_size, self.max_length))
                out = replay
                if replay is not None:
                    for span in replacement:
                        out = await self._guarded(span, span.step(out, replay_mask))
                self.stats.recoveries += 1
                log.warning("session %s: layers %s now on %s (replayed %d positions)", self.session_id, failed.span,
                            " + ".join(f"{s.server.server_id}[{s.span}]" for s in replacement),
                            0 if replay is None else replay.shape[1])
                return replacement, (out[:, -hidden.shape[1]:] if hidden is not None else None)
            except RETRYABLE as exc:
                for span in replacement:
                    self._discard(span)
                if time.monotonic() >= deadline:
                    self.stats.given_up += 1
                    raise Unavailable(f"layers {failed.span} lost their server and no replacement answered within "
                                      f"{self.settings.failover_timeout_s:.0f}s ({exc})") from exc
                await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    async def _guarded(self, span: RemoteSpan, operation):
        """Await `operation` of a replacement; ban its server if it fails."""
        try:
            return await operation
        except RETRYABLE:
            self.bans.ban(span.server.server_id)
            raise

    def _discard(self, span: RemoteSpan) -> None:
        """Close a failed hop in the background: a hung server must not hold the generation."""
        task = asyncio.create_task(span.close())
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.spans), *self._orphans, return_exceptions=True)


def _concat(history: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every input a hop received, as one step: [batch, positions, hidden], and its padding mask."""
    if not history:
        return None, None
    hidden = torch.cat([h for h, _ in history], dim=1)
    if all(m is None for _, m in history):
        return hidden, None
    masks = [m if m is not None else torch.ones(h.shape[:2], dtype=torch.long) for h, m in history]
    return hidden, torch.cat(masks, dim=1)
