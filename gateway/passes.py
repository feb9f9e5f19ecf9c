"""Stateless passes through the swarm's layers: forward and backward over ranges of layers, with no
session and no cache kept on the servers, routed like chains and retried elsewhere when a server
fails (the hop's input is kept, so a retried pass gives the same result). Fine-tuning
(gateway.tuning) runs on them; the gateway itself uses them to score prompts and to verify
results. Each pass carries a grant: signed by the gateway when it runs the pass, fetched from it
(GRANT_PATH) by a client outside it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import torch

from gateway.channel import Channel, Connect, websocket_connect
from gateway.routing import Hop
from gateway.swarm import Swarm
from shared import protocol
from shared.dtypes import COMPUTE_DTYPES
from shared.errors import BadRequest, CorollaError, ProtocolError, SessionLost, Unavailable
from shared.identity import MAX_SKEW_S
from shared.records import GRANT_PATH, ServerInfo

log = logging.getLogger(__name__)

FAULTS = (SessionLost, ProtocolError)  # the server's fault: ban it
RETRYABLE = (Unavailable, ProtocolError, BadRequest)
Records = Callable[[], Awaitable[list[ServerInfo]]]
Grants = Callable[[str], Awaitable[dict | None]]  # a grant for stateless passes on a server


async def _now(value):
    return value


async def _no_records() -> list[ServerInfo]:
    return []


class GatewayGrants:
    """Grants fetched from the gateway (GRANT_PATH) for a client outside it, each kept for half
    its validity."""

    def __init__(self, gateway: str, headers: Callable[[], dict]):
        self.gateway, self.headers = gateway, headers
        self._kept: dict[str, tuple[float, dict]] = {}

    async def __call__(self, server_id: str) -> dict | None:
        kept = self._kept.get(server_id)
        if kept is not None and time.monotonic() - kept[0] < MAX_SKEW_S / 2:
            return kept[1]
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(self.gateway + GRANT_PATH.format(server_id=server_id), headers=self.headers())
        if response.status_code != 200:
            raise Unavailable(f"the gateway gave no grant for {server_id} ({response.status_code})")
        self._kept[server_id] = (time.monotonic(), response.json())
        return self._kept[server_id][1]


@dataclass
class Pass:
    """What a forward pass leaves for its backward pass: each hop's layers and input."""

    hops: list[tuple[int, int, torch.Tensor]]  # (start, end, input [batch, tokens, hidden])
    mask: torch.Tensor | None
    prompts: torch.Tensor | None  # [layers, P, hidden]


class RemoteLayers:
    """The swarm's layers [0, num_layers) as stateless forward and backward passes, with retries."""

    def __init__(self, swarm: Swarm, records: Records, connect: Connect = websocket_connect,
                 step_timeout_s: float = 120.0, failover_timeout_s: float = 60.0, max_frame_bytes: int = 64 * 2**20,
                 refresh_s: float = 5.0, grants: Grants | None = None):
        self.swarm, self._records, self._connect = swarm, records, connect
        self._grants = grants or (lambda server_id: _now(swarm.grant(server_id)))  # in a gateway: it signs them
        self.step_timeout_s, self.failover_timeout_s = step_timeout_s, failover_timeout_s
        self.max_frame_bytes, self.refresh_s = max_frame_bytes, refresh_s
        self._refreshed = 0.0
        self._channels: dict[str, Channel] = {}
        self.retries = 0  # hops rerouted after a failure

    @classmethod
    def in_gateway(cls, swarm: Swarm, connect: Connect, config) -> RemoteLayers:
        """Passes run by a gateway itself (prompt scoring, verification): its registry is the
        swarm's view already, and `config` (a ChainConfig) sets the timeouts and frame size."""
        return cls(swarm, _no_records, connect, config.step_timeout_s, config.failover_timeout_s,
                   config.max_frame_bytes)

    async def forward_on(self, hop: Hop, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One stateless pass of `hidden` through `hop`'s layers on `hop`'s server, not rerouted:
        its failures raise."""
        return (await self._call(hop, protocol.Forward, hidden, Pass([], mask, None)))["hidden"]

    async def refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self._refreshed > self.refresh_s:
            for info in await self._records():
                if info.model == self.swarm.model.fingerprint:
                    self.swarm.registry.heartbeat(info)
            self._refreshed = time.monotonic()

    async def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                      prompts: torch.Tensor | None) -> tuple[torch.Tensor, Pass]:
        """hidden [batch, tokens, hidden] through every layer; the Pass remembers each hop's input."""
        trace = Pass([], mask, prompts)
        out = await self._forward_range(0, self.swarm.model.num_layers, hidden, trace)
        return out, trace

    async def backward(self, trace: Pass, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients with respect to the pass's input and deep prompts, hop by hop in reverse."""
        grad_prompts = None if trace.prompts is None else torch.zeros_like(trace.prompts, dtype=torch.float32)
        for start, end, hidden in reversed(trace.hops):
            grad, part = await self._backward_range(start, end, hidden, grad, trace)
            if grad_prompts is not None:
                grad_prompts[start:end] += part
        return grad, grad_prompts

    async def _forward_range(self, start: int, end: int, hidden: torch.Tensor, trace: Pass) -> torch.Tensor:
        deadline = time.monotonic() + self.failover_timeout_s
        layer = start
        while layer < end:
            await self.refresh()
            try:
                hops = self.swarm.route(layer, end)
            except Unavailable:
                await self._wait(deadline, f"no server covers layers {layer}..{end - 1}")
                continue
            for hop in hops:
                try:
                    out = await self._call(hop, protocol.Forward, hidden, trace)
                except RETRYABLE as exc:
                    await self._failed(hop, exc, deadline)
                    break  # reroute from this hop's first layer, with the same input
                trace.hops.append((hop.span.start, hop.span.end, hidden))
                hidden, layer = out["hidden"].float(), hop.span.end
        return hidden

    async def _backward_range(self, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor,
                              trace: Pass) -> tuple[torch.Tensor, torch.Tensor | None]:
        deadline = time.monotonic() + self.failover_timeout_s
        while True:
            await self.refresh()
            try:
                hops = self.swarm.route(start, end)
            except Unavailable:
                await self._wait(deadline, f"no server covers layers {start}..{end - 1}")
                continue
            try:
                if len(hops) == 1:
                    out = await self._call(hops[0], protocol.Backward, hidden, trace, grad)
                    return out["grad"].float(), _float(out.get("grad_prompts"))
                # the layers' server is gone and several now share them: recompute their inputs
                inner = Pass([], trace.mask, trace.prompts)
                await self._forward_range(start, end, hidden, inner)
                parts = torch.zeros(end - start, *trace.prompts.shape[1:]) if trace.prompts is not None else None
                for s, e, h in reversed(inner.hops):
                    grad, part = await self._backward_range(s, e, h, grad, inner)
                    if parts is not None:
                        parts[s - start:e - start] += part
                return grad, parts
            except RETRYABLE as exc:
                await self._failed(hops[0], exc, deadline)

    async def _call(self, hop: Hop, kind, hidden: torch.Tensor, trace: Pass, grad: torch.Tensor | None = None):
        server = hop.server
        dtype = COMPUTE_DTYPES.get(server.dtype, torch.float32)
        tensors = {"hidden": hidden.to(dtype)}
        if grad is not None:
            tensors["grad"] = grad.to(dtype)
        if trace.mask is not None:
            tensors["mask"] = trace.mask
        if trace.prompts is not None:
            tensors["prompts"] = trace.prompts[hop.span.start:hop.span.end].to(dtype)
        frame = protocol.encode(kind(model=self.swarm.model.fingerprint, span=[hop.span.start, hop.span.end],
                                     grant=await self._grants(server.server_id)), tensors)
        channel = self._channels.get(server.server_id)
        try:
            if channel is None:
                channel = await asyncio.wait_for(self._connect(server.url, 10.0, self.max_frame_bytes), 10.0)
                self._channels[server.server_id] = channel
            await asyncio.wait_for(channel.send(frame), self.step_timeout_s)
            data = await asyncio.wait_for(channel.recv(), self.step_timeout_s)
        except TimeoutError as exc:
            raise SessionLost(f"{server.server_id} gave no reply within {self.step_timeout_s}s") from exc
        except CorollaError:
            raise
        reply = protocol.decode(data, self.max_frame_bytes)
        if isinstance(reply.header, protocol.Error):
            raise CorollaError.for_code(reply.header.code)(f"{server.server_id}: {reply.header.message}")
        expected = "grad" if grad is not None else "hidden"
        out = reply.tensors.get(expected)
        if not isinstance(reply.header, protocol.Result) or out is None or out.shape != hidden.shape:
            raise ProtocolError(f"{server.server_id} answered a {kind.model_fields['type'].default} with "
                                f"{reply.type} {sorted(reply.tensors)}")
        if not bool(torch.isfinite(out).all()):
            raise ProtocolError(f"{server.server_id} returned non-finite values")
        return reply.tensors

    async def _failed(self, hop: Hop, error: Exception, deadline: float) -> None:
        self.retries += 1
        channel = self._channels.pop(hop.server.server_id, None)
        if channel is not None:
            channel.abort()
        if isinstance(error, FAULTS):
            seconds = self.swarm.ban(hop.server.server_id)
            log.warning("%s failed on layers %s (%s); banned for %.0fs, retrying", hop.server.server_id, hop.span,
                        error, seconds)
        else:
            log.info("%s refused layers %s (%s); retrying", hop.server.server_id, hop.span, error)
            await asyncio.sleep(0.2)
        await self._wait(deadline, str(error), sleep_s=0.0)

    async def _wait(self, deadline: float, why: str, sleep_s: float = 0.5) -> None:
        if time.monotonic() >= deadline:
            raise Unavailable(f"gave up after {self.failover_timeout_s:.0f}s: {why}")
        await asyncio.sleep(sleep_s)
        await self.refresh(force=True)

    async def close(self) -> None:
        """Close every connection politely; if this is cancelled (a client that went away, under a
        cancel scope that cancels every await), drop them all at once instead, so none is left open."""
        channels, self._channels = list(self._channels.values()), {}
        try:
            for channel in channels:
                await channel.close()
        except BaseException:
            for channel in channels:
                channel.abort()
            raise


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
