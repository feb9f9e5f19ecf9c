"""A chain session: one session per hop of the chain, driven step by step, with failover.

The gateway keeps, per hop, every input it sent (the client-side half of the paper's dual
attention caches). When a server fails (socket closed, error frame, no reply within the step
timeout), it is banned, a replacement chain is routed for exactly that hop's layers (one server or
several, with boundaries of their own), opened at position 0, and fed the hop's whole input
history plus the input of the broken step. Only the last rows of its output go downstream: the
downstream servers already hold the earlier positions. Greedy output is unchanged."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from gateway.channel import Channel, Connect, websocket_connect
from gateway.routing import Hop
from gateway.swarm import Swarm
from shared import protocol
from shared.dtypes import COMPUTE_DTYPES
from shared.errors import CorollaError, ProtocolError, SessionLost, Unavailable

log = logging.getLogger(__name__)

# What a replacement can fix. BadRequest is not in it: the same input would fail anywhere.
RETRYABLE = (Unavailable, ProtocolError)


@dataclass(frozen=True)
class ChainConfig:
    step_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    failover_timeout_s: float = 30.0
    failover: bool = True
    max_frame_bytes: int = 64 * 2**20

    @classmethod
    def of(cls, settings) -> ChainConfig:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


class HopSession:
    """One session on one blockserver, running one hop's layers."""

    def __init__(self, hop: Hop, session_id: str, swarm: Swarm, config: ChainConfig, connect: Connect):
        self.server, self.span = hop.server, hop.span
        self.session_id = session_id
        self.config, self._connect = config, connect
        self.lease = swarm.lease(self.server.server_id)
        self.channel: Channel | None = None
        self.dtype = COMPUTE_DTYPES.get(self.server.dtype, torch.float32)
        self.position = 0
        self.history: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (input, mask) of each step

    def __str__(self) -> str:
        return f"{self.server.server_id}[{self.span}]"

    async def open(self, model: str, batch_size: int, max_length: int) -> None:
        self.channel = await asyncio.wait_for(
            self._connect(self.server.url, self.config.connect_timeout_s, self.config.max_frame_bytes),
            self.config.connect_timeout_s)
        await self._call(protocol.Open(session_id=self.session_id, model=model, span=[self.span.start, self.span.end],
                                       batch_size=batch_size, max_length=max_length, dtype=self.server.dtype),
                         None, protocol.Ready)

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: [batch, tokens, hidden] -> the hop's output, same shape."""
        tensors = {"hidden": hidden.to(self.dtype)}
        if mask is not None:
            tensors["mask"] = mask
        reply = await self._call(protocol.Step(step_id=len(self.history), position=self.position), tensors,
                                 protocol.Result)
        out = reply.tensors.get("hidden")
        if out is None or out.shape != hidden.shape:
            raise ProtocolError(f"{self.server.server_id} returned {None if out is None else list(out.shape)} "
                                f"for a step of {list(hidden.shape)}")
        self.history.append((hidden, mask))
        self.position += hidden.shape[1]
        return out

    async def _call(self, header: protocol.Header, tensors, expected: type[protocol.Header]) -> protocol.Message:
        try:
            await asyncio.wait_for(self.channel.send(protocol.encode(header, tensors)), self.config.step_timeout_s)
            data = await asyncio.wait_for(self.channel.recv(), self.config.step_timeout_s)
        except TimeoutError as exc:
            raise SessionLost(f"{self.server.server_id} gave no reply within {self.config.step_timeout_s}s") from exc
        message = protocol.decode(data, self.config.max_frame_bytes)
        if isinstance(message.header, protocol.Error):
            error = CorollaError.for_code(message.header.code)
            raise error(f"{self.server.server_id}: {message.header.message}")
        if not isinstance(message.header, expected):
            raise ProtocolError(f"{self.server.server_id} answered {message.type!r} to a request for "
                                f"{expected.model_fields['type'].default!r}")
        return message

    async def close(self) -> None:
        """Give the lease back (synchronously, before any await), then close the channel."""
        self.lease.release()
        channel, self.channel = self.channel, None
        if channel is None:
            return
        try:
            await asyncio.wait_for(channel.send(protocol.encode(protocol.Close())), 1.0)
            await asyncio.wait_for(channel.close(), 2.0)
        except (CorollaError, TimeoutError, OSError):
            channel.abort()  # a hung peer: drop the connection without a handshake


class ChainSession:
    """A generation's sessions on every hop of its chain, opened together, closed together."""

    def __init__(self, hops: list[Hop], swarm: Swarm, config: ChainConfig, batch_size: int, max_length: int,
                 connect: Connect = websocket_connect):
        self.session_id = f"sess-{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count()
        self.swarm, self.config, self._connect = swarm, config, connect
        self.model = swarm.model.fingerprint
        self.batch_size, self.max_length = batch_size, max_length
        self.hops = [self._hop_session(h) for h in hops]
        self._orphans: set[asyncio.Task] = set()

    def _hop_session(self, hop: Hop) -> HopSession:
        # every hop session has its own id: a replacement may land on a server already in the chain
        return HopSession(hop, f"{self.session_id}-{next(self._ids)}", self.swarm, self.config, self._connect)

    async def __aenter__(self) -> ChainSession:
        try:
            results = await asyncio.gather(*(h.open(self.model, self.batch_size, self.max_length) for h in self.hops),
                                           return_exceptions=True)
            for index in reversed(range(len(self.hops))):  # replace the hops that failed to open
                if isinstance(results[index], BaseException):
                    if not isinstance(results[index], RETRYABLE):
                        raise results[index]
                    self.hops[index:index + 1], _ = await self._replace(self.hops[index], results[index], None, None)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def describe(self) -> str:
        return " -> ".join(str(h) for h in self.hops)

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new positions through the whole chain. hidden: [batch, tokens, hidden]."""
        index = 0
        while index < len(self.hops):
            hop = self.hops[index]
            try:
                out = await hop.step(hidden, mask)
                index += 1
            except RETRYABLE as exc:
                replacement, out = await self._replace(hop, exc, hidden, mask)
                self.hops[index:index + 1] = replacement
                index += len(replacement)
            hidden = out
        return hidden

    async def _replace(self, failed: HopSession, error: Exception, hidden: torch.Tensor | None,
                       mask: torch.Tensor | None) -> tuple[list[HopSession], torch.Tensor | None]:
        """Route, open and rebuild replacements for `failed`'s layers. Returns them and the output
        of the pending step `hidden` (the last rows of the replay), if there was one."""
        stats = self.swarm.failovers
        stats.failures += 1
        banned_for = self.swarm.ban(failed.server.server_id)
        log.warning("session %s: %s failed at position %d: %s; banned for %.0fs, replacing",
                    self.session_id, failed, failed.position, error, banned_for)
        self._discard(failed)
        if not self.config.failover:
            stats.given_up += 1
            raise Unavailable(f"layers {failed.span} lost their server ({error}) and failover is off")
        history = failed.history + ([(hidden, mask)] if hidden is not None else [])
        replay, replay_mask = _concat(history)
        deadline = time.monotonic() + self.config.failover_timeout_s
        while True:
            replacement: list[HopSession] = []
            try:
                hops = self.swarm.route(failed.span.start, failed.span.end, self.batch_size * self.max_length)
                replacement = [self._hop_session(h) for h in hops]
                for hop in replacement:
                    await self._guarded(hop, hop.open(self.model, self.batch_size, self.max_length))
                out = replay
                if replay is not None:
                    for hop in replacement:
                        out = await self._guarded(hop, hop.step(out, replay_mask))
                stats.recoveries += 1
                log.warning("session %s: layers %s now on %s (replayed %d positions)", self.session_id, failed.span,
                            " + ".join(str(h) for h in replacement), 0 if replay is None else replay.shape[1])
                return replacement, (out[:, -hidden.shape[1]:] if hidden is not None else None)
            except RETRYABLE as exc:
                for hop in replacement:
                    self._discard(hop)
                if time.monotonic() >= deadline:
                    stats.given_up += 1
                    raise Unavailable(f"layers {failed.span} lost their server and no replacement answered within "
                                      f"{self.config.failover_timeout_s:.0f}s ({exc})") from exc
                await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    async def _guarded(self, hop: HopSession, operation):
        """Await `operation` of a replacement; ban its server if it fails."""
        try:
            return await operation
        except RETRYABLE:
            self.swarm.ban(hop.server.server_id)
            raise

    def _discard(self, hop: HopSession) -> None:
        """Close a failed hop in the background: a hung server must not hold the generation."""
        hop.lease.release()
        task = asyncio.create_task(hop.close())
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def close(self) -> None:
        for hop in self.hops:
            hop.lease.release()
        await asyncio.gather(*(h.close() for h in self.hops), *self._orphans, return_exceptions=True)


def _concat(history: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every input a hop received, as one step: [batch, positions, hidden], and its padding mask."""
    if not history:
        return None, None
    hidden = torch.cat([h for h, _ in history], dim=1)
    if all(m is None for _, m in history):
        return hidden, None
    masks = [m if m is not None else torch.ones(h.shape[:2], dtype=torch.long) for h, m in history]
    return hidden, torch.cat(masks, dim=1)
