"""A chain session: one session per hop of the chain, driven step by step, with failover.

The gateway keeps, per hop, every input it sent (the client-side half of the paper's dual
attention caches), in the wire dtype. When a hop fails, what happens depends on why:
- a *fault* (socket lost, no reply within the step timeout, a malformed, mis-shaped or non-finite
  result): the server is banned, and a replacement chain is routed for exactly that hop's layers
  (one server or several, with boundaries of their own), opened at position 0 and fed the hop's
  whole input history plus the broken step;
- *back-pressure* (`cache_full`): no ban; the hop moves to a server with room the same way, and
  when no server has room the caller is told (CacheFull) so that it can queue and recompute;
- a *refusal* (the server is moving, refuses the request, or freed an idle session): no ban; the
  hop is rebuilt elsewhere (or, for an expired session, on the same server).
Only the last rows of a replay go downstream: the downstream servers already hold the earlier
positions. Greedy output is unchanged.

Long steps (prompts, replays) go in chunks of `step_chunk_tokens` token-rows, each under its own
step timeout and frame limit. Closing gives every lease back synchronously, then closes the
sockets in a task that cancellation (a client that went away) cannot interrupt."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gateway.channel import Channel, Connect, websocket_connect
from gateway.routing import Hop
from gateway.swarm import Swarm
from shared import protocol
from shared.dtypes import COMPUTE_DTYPES
from shared.errors import (
    BadRequest,
    CacheFull,
    CorollaError,
    ProtocolError,
    SessionExpired,
    SessionLost,
    Unavailable,
    WrongResult,
)

log = logging.getLogger(__name__)

FAULTS = (SessionLost, ProtocolError, WrongResult)  # the server's fault: ban it
RECOVERABLE = (Unavailable, ProtocolError, BadRequest)  # anything a rebuilt hop may fix
_CLEANUPS: set[asyncio.Task] = set()  # closes in flight, kept alive past a cancelled caller


class NeedsRecompute(Unavailable):
    """A hop failed and its input history was dropped (over the cap): the caller recomputes the
    whole chain from tokens instead."""

    code = "unavailable"


@dataclass(frozen=True)
class ChainConfig:
    step_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    failover_timeout_s: float = 30.0
    failover: bool = True
    max_frame_bytes: int = 64 * 2**20
    step_chunk_tokens: int = 512  # token-rows per frame of a long step
    wire_codec: str = "raw"  # how hidden states cross the network both ways (shared/codec.py)
    max_history_mib: float = 512.0  # per session; beyond it a failure is repaired by recomputing

    @classmethod
    def of(cls, settings) -> ChainConfig:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


class HopSession:
    """One session on one blockserver, running one hop's layers."""

    def __init__(self, hop: Hop, session_id: str, swarm: Swarm, config: ChainConfig, connect: Connect,
                 prompts: torch.Tensor | None = None):
        self.server, self.span = hop.server, hop.span
        self.prompts = prompts  # the chain's deep prompts [all layers, P, hidden], sent while position < P
        self.session_id = session_id
        self.swarm, self.config, self._connect = swarm, config, connect
        self.lease = swarm.lease(self.server.server_id)
        self.channel: Channel | None = None
        self.dtype = COMPUTE_DTYPES.get(self.server.dtype, torch.float32)
        self.position = 0
        self.history: list[tuple[torch.Tensor, torch.Tensor | None]] | None = []  # (input, mask) sent; None: dropped

    def __str__(self) -> str:
        return f"{self.server.server_id}[{self.span}]"

    @property
    def history_bytes(self) -> int:
        return sum(h.nbytes for h, _ in self.history or [])

    async def open(self, model: str, batch_size: int, max_length: int, reserve_length: int) -> None:
        try:
            self.channel = await asyncio.wait_for(
                self._connect(self.server.url, self.config.connect_timeout_s, self.config.max_frame_bytes),
                self.config.connect_timeout_s)
        except TimeoutError as exc:
            raise SessionLost(f"{self.server.server_id}: no connection within {self.config.connect_timeout_s}s") from exc
        await self._call(protocol.Open(session_id=self.session_id, model=model, span=[self.span.start, self.span.end],
                                       grant=self.swarm.grant(self.server.server_id, self.session_id),
                                       batch_size=batch_size, max_length=max_length, dtype=self.server.dtype,
                                       reserve_length=min(reserve_length, max_length), wire=self.config.wire_codec),
                         None, protocol.Ready)

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: [batch, tokens, hidden] -> the hop's output, same shape. Sent in chunks of at
        most `step_chunk_tokens` token-rows, each with its own timeout."""
        hidden = hidden.to(self.dtype)
        chunk = max(1, self.config.step_chunk_tokens // hidden.shape[0])
        outputs = []
        for start in range(0, hidden.shape[1], chunk):
            piece = hidden[:, start:start + chunk]
            piece_mask = None if mask is None else mask[:, start:start + chunk]
            outputs.append(await self._step_once(piece, piece_mask))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _step_once(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tensors = {"hidden": hidden} | ({"mask": mask} if mask is not None else {})
        if self.prompts is not None and self.position < self.prompts.shape[1]:
            tensors["prompts"] = self.prompts[self.span.start:self.span.end].to(self.dtype)
        step_id = self.position
        reply = await self._call(protocol.Step(step_id=step_id, position=self.position), tensors, protocol.Result)
        out = reply.tensors.get("hidden")
        if out is None or out.shape != hidden.shape or out.dtype != hidden.dtype or reply.header.step_id != step_id:
            raise ProtocolError(f"{self.server.server_id} returned {None if out is None else list(out.shape)} "
                                f"for a step of {list(hidden.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise ProtocolError(f"{self.server.server_id} returned non-finite hidden states")
        verifier = self.swarm.verifier
        if verifier is not None and self.history is not None and self.prompts is None and verifier.wanted():
            inputs, inputs_mask = await asyncio.to_thread(_concat, self.history + [(hidden, mask)])
            await verifier.check(self.server, self.span.start, self.span.end, inputs, inputs_mask, out)
        if self.history is not None:
            self.history.append((hidden, mask))
        self.position += hidden.shape[1]
        self.swarm.bans.succeeded(self.server.server_id)
        return out

    async def _call(self, header: protocol.Header, tensors, expected: type[protocol.Header]) -> protocol.Message:
        try:
            await asyncio.wait_for(self.channel.send(protocol.encode(header, tensors, self.config.wire_codec)),
                                   self.config.step_timeout_s)
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
    """A generation's sessions on every hop of its chain, opened together, closed together.
    `reserve_length`: the room each server reserves per row at once (the prompt); more is taken
    in pages as the session grows, up to `max_length`."""

    def __init__(self, hops: list[Hop], swarm: Swarm, config: ChainConfig, batch_size: int, max_length: int,
                 connect: Connect = websocket_connect, reserve_length: int | None = None,
                 on_closed: Callable[[], None] = lambda: None, prompts: torch.Tensor | None = None):
        self.session_id = f"sess-{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count()
        self.swarm, self.config, self._connect = swarm, config, connect
        self.model = swarm.model.fingerprint
        self.batch_size, self.max_length = batch_size, max_length
        self.reserve_length = reserve_length or max_length
        self.prompts = prompts  # deep prompts of a tuned model [layers, P, hidden], or None
        self.hops = [self._hop_session(h) for h in hops]
        self.full: set[str] = set()  # servers that had no room for this session
        self.refused: set[str] = set()  # servers that refused it (moving, refusing the request)
        self._orphans: set[asyncio.Task] = set()
        self._on_closed = on_closed
        self._closed = False

    def _hop_session(self, hop: Hop) -> HopSession:
        # every hop session has its own id: a replacement may land on a server already in the chain
        return HopSession(hop, f"{self.session_id}-{next(self._ids)}", self.swarm, self.config, self._connect,
                          self.prompts)

    async def __aenter__(self) -> ChainSession:
        try:
            results = await asyncio.gather(*(self._open(h) for h in self.hops), return_exceptions=True)
            for index in reversed(range(len(self.hops))):  # rebuild the hops that failed to open
                error = results[index]
                if isinstance(error, BaseException):
                    if not isinstance(error, RECOVERABLE):
                        raise error
                    self.hops[index:index + 1], _ = await self._recover(self.hops[index], error, None, None)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _open(self, hop: HopSession) -> None:
        await hop.open(self.model, self.batch_size, self.max_length, self.reserve_length)

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
            except RECOVERABLE as exc:
                replacement, out = await self._recover(hop, exc, hidden, mask)
                self.hops[index:index + 1] = replacement
                index += len(replacement)
            hidden = out
        self._cap_history()
        return hidden

    def _cap_history(self) -> None:
        if all(h.history is None for h in self.hops):
            return
        if sum(h.history_bytes for h in self.hops) > self.config.max_history_mib * 2**20:
            log.info("session %s: input history over %.0f MiB; a failure will be repaired by recomputing",
                     self.session_id, self.config.max_history_mib)
            for h in self.hops:
                h.history = None

    def _judge(self, hop: HopSession, error: Exception) -> bool:
        """Decide what `error` of `hop` means; True for a fault (the server is banned)."""
        if isinstance(error, FAULTS):
            self.swarm.failovers.failures += 1
            seconds = self.swarm.ban(hop.server.server_id)
            log.warning("session %s: %s failed at position %d: %s; banned for %.0fs", self.session_id, hop,
                        hop.position, error, seconds)
            return True
        if isinstance(error, CacheFull):
            self.full.add(hop.server.server_id)
        elif not isinstance(error, SessionExpired):  # an expired session may be rebuilt on the same server
            self.refused.add(hop.server.server_id)
        self.swarm.failovers.moves += 1
        log.info("session %s: %s refused (%s); moving the hop", self.session_id, hop, error)
        return False

    async def _recover(self, failed: HopSession, error: Exception, hidden: torch.Tensor | None,
                       mask: torch.Tensor | None) -> tuple[list[HopSession], torch.Tensor | None]:
        """Route, open and rebuild replacements for `failed`'s layers. Returns them and the output
        of the pending step `hidden` (the last rows of the replay), if there was one."""
        fault = self._judge(failed, error)
        stats = self.swarm.failovers
        self._discard(failed)
        if fault and not self.config.failover:
            stats.given_up += 1
            raise Unavailable(f"layers {failed.span} lost their server ({error}) and failover is off")
        if failed.history is None:
            raise NeedsRecompute(f"layers {failed.span} lost their server ({error})")
        history = failed.history + ([(hidden.to(failed.dtype), mask)] if hidden is not None else [])
        replay, replay_mask = await asyncio.to_thread(_concat, history)  # tens of MB: not on the event loop
        deadline = time.monotonic() + self.config.failover_timeout_s
        while True:
            replacement: list[HopSession] = []
            try:
                hops = self.swarm.route(failed.span.start, failed.span.end, self.batch_size * self.reserve_length,
                                        exclude=self.full | self.refused)
                replacement = [self._hop_session(h) for h in hops]
                for hop in replacement:
                    await self._guarded(hop, self._open(hop))
                out = replay
                if replay is not None:
                    for hop in replacement:
                        out = await self._guarded(hop, hop.step(out, replay_mask))
                if fault:
                    stats.recoveries += 1
                log.log(logging.WARNING if fault else logging.INFO, "session %s: layers %s now on %s (replayed %d "
                        "positions)", self.session_id, failed.span, " + ".join(str(h) for h in replacement),
                        0 if replay is None else replay.shape[1])
                return replacement, (out[:, -hidden.shape[1]:] if hidden is not None else None)
            except RECOVERABLE as exc:
                for hop in replacement:
                    self._discard(hop)
                if self._only_full_servers_left(failed):
                    raise CacheFull(f"no server of layers {failed.span} has room for this session") from exc
                if time.monotonic() >= deadline:
                    if fault:
                        stats.given_up += 1
                    raise Unavailable(f"layers {failed.span} lost their server and no replacement answered within "
                                      f"{self.config.failover_timeout_s:.0f}s ({exc})") from exc
                await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def _only_full_servers_left(self, failed: HopSession) -> bool:
        """Are the layers uncovered only because the servers that had no room are left out? Then
        this is back-pressure, for the caller to wait out, not an outage to wait for here."""
        if not self.full:
            return False
        try:
            self.swarm.route(failed.span.start, failed.span.end, exclude=self.refused)
        except Unavailable:
            return False  # a real outage: keep waiting for a replacement
        try:
            self.swarm.route(failed.span.start, failed.span.end, exclude=self.full | self.refused)
        except Unavailable:
            return True
        return False

    async def _guarded(self, hop: HopSession, operation):
        """Await `operation` of a replacement hop; judge its failure like any other."""
        try:
            return await operation
        except RECOVERABLE as exc:
            self._judge(hop, exc)
            raise

    def _discard(self, hop: HopSession) -> None:
        """Close a failed hop in the background: a hung server must not hold the generation."""
        hop.lease.release()
        task = asyncio.create_task(hop.close())
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def close(self) -> None:
        """Leases back at once; sockets closed in a task of their own, awaited through a shield, so a
        cancelled caller (a client that went away) cannot stop the cleanup halfway."""
        if self._closed:
            return
        self._closed = True
        for hop in self.hops:
            hop.lease.release()
        task = asyncio.ensure_future(asyncio.gather(*(h.close() for h in self.hops), *self._orphans,
                                                    return_exceptions=True))
        _CLEANUPS.add(task)
        task.add_done_callback(lambda t: (_CLEANUPS.discard(t), self._on_closed()))
        await asyncio.shield(task)


def _concat(history: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every input a hop received, as one step: [batch, positions, hidden], and its padding mask."""
    if not history:
        return None, None
    hidden = torch.cat([h for h, _ in history], dim=1)
    if all(m is None for _, m in history):
        return hidden, None
    masks = [m if m is not None else torch.ones(h.shape[:2], dtype=torch.long) for h, m in history]
    return hidden, torch.cat(masks, dim=1)
