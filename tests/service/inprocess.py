"""Gateways and blockservers in this process: the real apps (lifespans, routes, session handlers,
runtimes, real transformers layers) with no sockets.

The gateway's chain reaches blockservers through its `connect` seam: `AsgiChannel` speaks the ASGI
websocket protocol straight to a blockserver app. `Faults` wraps channels so that a chosen server
fails at a chosen step (drops the socket, stops answering, or answers garbage)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from blockserver.app import create_app as create_blockserver
from blockserver.settings import BlockserverSettings
from gateway.app import create_app as create_gateway
from gateway.settings import GatewaySettings
from shared import protocol
from shared.errors import SessionLost


class AsgiChannel:
    """A websocket to an ASGI app, as a gateway `Channel`."""

    def __init__(self, app, path: str = "/ws"):
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
                 "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
                 "client": ("127.0.0.1", 1), "server": ("test", 80), "subprotocols": [], "state": {}}
        self._task = asyncio.create_task(app(scope, self._to_app.get, self._from_app.put))
        self.closed = False

    async def accept(self) -> None:
        await self._to_app.put({"type": "websocket.connect"})
        message = await self._from_app.get()
        if message["type"] != "websocket.accept":
            raise SessionLost(f"refused: {message}")

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise SessionLost("channel closed")
        await self._to_app.put({"type": "websocket.receive", "bytes": frame})

    async def recv(self) -> bytes:
        message = await self._from_app.get()
        if message["type"] == "websocket.send":
            return message.get("bytes") or message.get("text", "").encode()
        self.closed = True
        raise SessionLost(f"the server closed the session ({message['type']})")

    async def close(self) -> None:
        self.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._to_app.put_nowait({"type": "websocket.disconnect", "code": 1000})


@dataclass
class Fault:
    """Make server `server_id` fail at its `at_step`-th step frame (0-based, counted over all of its
    sessions): 'drop' closes the socket, 'hang' never answers, 'garbage' answers a frame of junk,
    'nan' answers non-finite hidden states, 'refuse' and 'full' answer bad_request / cache_full
    error frames; 'lie' answers perturbed hidden states from then on (to steps and passes alike)."""

    server_id: str
    at_step: int
    kind: str = "drop"
    seen: int = 0
    frames: type = protocol.Step  # which messages count (Step, Forward, Backward)


class FaultyChannel:
    def __init__(self, inner: AsgiChannel, fault: Fault):
        self.inner, self.fault = inner, fault
        self._pending_fault: str | None = None

    async def send(self, frame: bytes) -> None:
        if isinstance(protocol.decode(frame, 1 << 30).header, self.fault.frames):
            if self.fault.seen == self.fault.at_step:
                self._pending_fault = self.fault.kind
            self.fault.seen += 1
        if self._pending_fault == "drop":
            self.inner.abort()
            raise SessionLost("dropped on purpose")
        if self._pending_fault in (None, "nan", "lie"):
            await self.inner.send(frame)

    async def recv(self) -> bytes:
        fault, self._pending_fault = self._pending_fault, None
        if self.fault.kind == "lie" and self.fault.seen > self.fault.at_step:
            # from its at_step-th step on, every hidden state it returns (steps and passes) is off
            reply = protocol.decode(await self.inner.recv(), 1 << 30)
            if "hidden" not in reply.tensors:
                return protocol.encode(reply.header, reply.tensors)
            hidden = reply.tensors["hidden"]
            return protocol.encode(reply.header, reply.tensors | {"hidden": hidden + 0.5 * hidden.float().std()})
        if fault == "hang":
            await asyncio.Event().wait()
        if fault == "garbage":
            return b"\x00\x00\x00\x02zz"
        if fault in ("refuse", "full"):
            return protocol.error_frame("bad_request" if fault == "refuse" else "cache_full", f"{fault} on purpose")
        if fault == "nan":
            reply = protocol.decode(await self.inner.recv(), 1 << 30)
            return protocol.encode(reply.header, {"hidden": torch.full_like(reply.tensors["hidden"], float("nan"))})
        return await self.inner.recv()

    async def close(self) -> None:
        await self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


@dataclass
class InProcessSwarm:
    """A gateway app and blockserver apps, all in this process; `client` talks to the gateway."""

    gateway: object
    client: httpx.AsyncClient
    blockservers: dict[str, object] = field(default_factory=dict)  # server_id -> app
    faults: list[Fault] = field(default_factory=list)
    channels: list[AsgiChannel] = field(default_factory=list)

    async def connect(self, url: str, timeout_s: float, max_frame_bytes: int):
        server_id = url.rsplit("/", 1)[-1]
        app = self.blockservers.get(server_id)
        if app is None:
            raise SessionLost(f"cannot connect to {url}")
        channel = AsgiChannel(app)
        self.channels.append(channel)
        await channel.accept()
        for fault in self.faults:
            if fault.server_id == server_id:
                return FaultyChannel(channel, fault)
        return channel

    @property
    def state(self):
        return self.gateway.state.gateway

    def service(self, server_id: str):
        return self.blockservers[server_id].state.service

    def announce(self) -> None:
        """Every blockserver's current record into the gateway's registry (what a heartbeat does)."""
        for app in self.blockservers.values():
            info = app.state.service.info()
            if info is not None:
                self.state.swarm.heartbeat(info)

    async def add_blockserver(self, stack: contextlib.AsyncExitStack, model: Path, span: str, server_id: str,
                              **settings) -> object:
        fields = dict(model=str(model), blocks=span, throughput=1000.0, server_id=server_id, num_threads=1,
                      dtype="float32", heartbeat_interval_s=60.0) | settings
        app = create_blockserver(BlockserverSettings(**fields), f"http://inprocess/{server_id}")
        await stack.enter_async_context(app.router.lifespan_context(app))
        self.blockservers[server_id] = app
        self.announce()
        return app


@contextlib.asynccontextmanager
async def in_process_swarm(model: Path, spans: dict[str, str], gateway: dict | None = None,
                           faults: list[Fault] = (), **blockserver) -> AsyncIterator[InProcessSwarm]:
    """A gateway serving `model` and a blockserver per {server_id: 'START:END'}, in this process."""
    async with contextlib.AsyncExitStack() as stack:
        swarm = InProcessSwarm(gateway=None, client=None, faults=list(faults))
        settings = GatewaySettings(**{"model": str(model), "model_name": "tiny", "num_threads": 1,
                                      "ping_interval_s": 3600.0, "dtype": "float32"} | (gateway or {}))
        app = create_gateway(settings, connect=swarm.connect)
        await stack.enter_async_context(app.router.lifespan_context(app))
        swarm.gateway = app
        swarm.client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60))
        for server_id, span in spans.items():
            await swarm.add_blockserver(stack, model, span, server_id, **blockserver)
        try:
            yield swarm
        finally:
            for channel in swarm.channels:
                channel.abort()
