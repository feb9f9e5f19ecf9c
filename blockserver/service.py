"""A blockserver's life: measure itself, choose its span from the swarm (or take --blocks), announce
`joining`, load, announce `online`, and move when the swarm would be faster with it elsewhere."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

from blockserver.runtime import Runtime
from blockserver.settings import BlockserverSettings
from blockserver.throughput import Throughput, measure
from shared.balancing import Placement, choose_span, placements, should_move
from shared.compute import ComputeThread
from shared.models.base import build_skeleton, resolve_dtype
from shared.models.loader import family_for, load_config, load_span, num_layers
from shared.models.resolve import DEFAULT_CACHE_DIR, resolve_model, served_name
from shared.protocol import DTYPE_NAMES
from shared.records import ServerInfo, ServerState, Span

log = logging.getLogger(__name__)
VERSION = "0.1.0"
SECRET_HEADER = "X-Corolla-Swarm-Secret"
PING_EMA = 0.2  # weight of a new RTT sample


class Blockserver:
    def __init__(self, settings: BlockserverSettings, url: str):
        self.settings, self.url = settings, url
        self.server_id = settings.server_id or f"bs-{uuid.uuid4().hex[:10]}"
        self.compute = ComputeThread("compute", settings.num_threads)
        self.fixed_span = Span.parse(settings.blocks) if settings.blocks else None
        self.span: Span | None = None
        self.state = ServerState.joining
        self.runtime: Runtime | None = None
        self.throughput: Throughput | None = None
        self.model_name = ""
        self.model_dir: Path | None = None
        self.num_layers = 0
        self.next_pings: dict[str, float] = {}
        self.swarm: list[ServerInfo] = []  # the registry's view, refreshed with each heartbeat
        self.http = httpx.AsyncClient(timeout=max(2.0, settings.heartbeat_interval_s),
                                      headers={SECRET_HEADER: settings.swarm_secret} if settings.swarm_secret else {})

    # ---- what we announce
    def info(self) -> ServerInfo | None:
        if self.span is None:
            return None  # nothing to announce before a span is chosen
        runtime, tp = self.runtime, self.throughput
        return ServerInfo(
            server_id=self.server_id, url=self.url, model=self.model_name, start=self.span.start, end=self.span.end,
            state=self.state, throughput=self.announced_throughput(),
            inference_rps=tp.inference_rps if tp else 0.0, forward_rps=tp.forward_rps if tp else 0.0,
            network_rps=tp.network_rps if tp else 0.0,
            cache_tokens_left=runtime.cache_tokens_left if runtime else self.settings.cache_tokens,
            sessions=len(runtime.sessions) if runtime else 0,
            dtype=DTYPE_NAMES[runtime.span.dtype] if runtime else self.settings.dtype, version=VERSION,
            next_pings=dict(self.next_pings), ttl_s=3 * self.settings.heartbeat_interval_s)

    def announced_throughput(self) -> float:
        if self.settings.throughput is not None:
            return self.settings.throughput
        if self.throughput is None or self.span is None:
            return 1.0
        return self.throughput.announced(len(self.span))

    # ---- start-up
    async def start(self) -> None:
        s = self.settings
        self.model_dir = await self.compute.run(resolve_model, s.model, s.cache_dir)  # may convert: torch work
        self.model_name = s.model_name or served_name(s.model, self.model_dir)
        config = load_config(self.model_dir)
        self.num_layers = num_layers(config)
        if s.throughput is None:
            cache = Path(s.cache_dir or DEFAULT_CACHE_DIR) / "throughput.json"
            self.throughput = await self.compute.run(measure, self.model_dir, s.device, s.dtype, cache)
        if self.fixed_span is not None:
            span = self.fixed_span
        else:
            await asyncio.sleep(random.uniform(0, s.join_delay_s))  # simultaneous joiners see each other
            span = await self.choose(config)
        await self.load(span)

    async def choose(self, config) -> Span:
        blocks = self.settings.num_blocks or await self.compute.run(blocks_for_memory, config, self.settings)
        swarm = [p for p in placements(await self.fetch_swarm()) if p.server_id != self.server_id]
        span = choose_span(swarm, self.num_layers, blocks)
        log.info("blockserver %s chose layers %s (%d blocks) from %d servers", self.server_id, span, blocks, len(swarm))
        return span

    async def load(self, span: Span) -> None:
        self.span, self.state = span, ServerState.joining
        await self.heartbeat_now()  # joining: others plan around us while we load

        def progress(done: int, total: int) -> None:
            print(f"blockserver {self.server_id}: loading layers {span}: {done}/{total}", file=sys.stderr, flush=True)

        loaded = await self.compute.run(load_span, self.model_dir, span.start, span.end, self.settings.device,
                                        self.settings.dtype, progress)
        self.runtime = Runtime(loaded, self.settings.cache_tokens, self.compute, self.settings.prefill_chunk_tokens)
        self.state = ServerState.online
        await self.heartbeat_now()
        log.info("blockserver %s serving %s layers %s at %s", self.server_id, self.model_name, span, self.url)

    # ---- the registry
    async def fetch_swarm(self) -> list[ServerInfo]:
        """Live records of our model from the first gateway that answers."""
        for gateway in self.settings.gateways:
            try:
                response = await self.http.get(f"{gateway}/registry/servers")
                if response.status_code == 200:
                    self.swarm = [ServerInfo(**r) for r in response.json() if r.get("model") == self.model_name]
                    return self.swarm
                log.warning("gateway %s refused the registry read: %s", gateway, response.status_code)
            except httpx.HTTPError as exc:
                log.warning("gateway %s unreachable: %s", gateway, type(exc).__name__)
        return self.swarm

    async def heartbeat_now(self) -> None:
        info = self.info()
        if info is None:
            return
        payload = info.model_dump(mode="json")

        async def send(gateway: str) -> None:
            try:
                response = await self.http.post(f"{gateway}/registry/heartbeat", json=payload)
                if response.status_code != 200:
                    log.warning("gateway %s refused the heartbeat: %s %s", gateway, response.status_code,
                                response.text[:200])
            except httpx.HTTPError as exc:
                log.warning("gateway %s unreachable: %s", gateway, type(exc).__name__)

        await asyncio.gather(*(send(g) for g in self.settings.gateways))

    async def heartbeat_loop(self) -> None:
        while True:
            await self.heartbeat_now()
            await self.fetch_swarm()
            await self.ping_next()
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def ping_next(self) -> None:
        """RTTs to the servers a chain may go to after us (those covering our span's end)."""
        if self.span is None:
            return
        candidates = [s for s in self.swarm if s.server_id != self.server_id and s.start <= self.span.end < s.end]

        async def ping(s: ServerInfo) -> None:
            started = time.perf_counter()
            try:
                await self.http.get(f"{s.url}/health", timeout=2.0)
            except httpx.HTTPError:
                return
            rtt = time.perf_counter() - started
            old = self.next_pings.get(s.server_id)
            self.next_pings[s.server_id] = rtt if old is None else PING_EMA * rtt + (1 - PING_EMA) * old

        await asyncio.gather(*(ping(s) for s in candidates[:5]))
        live = {s.server_id for s in self.swarm}
        self.next_pings = {k: v for k, v in self.next_pings.items() if k in live}

    # ---- rebalancing
    async def rebalance_loop(self) -> None:
        period = self.settings.balance_period_s
        while True:
            await asyncio.sleep(random.uniform(0, 2 * period))
            if self.state != ServerState.online or self.span is None:
                continue
            swarm = placements(await self.fetch_swarm())
            me = Placement(self.server_id, self.span.start, len(self.span), self.announced_throughput())
            target = should_move(me, [p for p in swarm if p.server_id != self.server_id] + [me], self.num_layers,
                                 self.settings.balance_quality)
            if target is not None:
                await self.move(target)

    async def move(self, span: Span) -> None:
        log.warning("blockserver %s moves from layers %s to %s (the swarm's weakest layer gains)",
                    self.server_id, self.span, span)
        self.state = ServerState.offline
        await self.heartbeat_now()
        old, self.runtime = self.runtime, None
        if old is not None:
            await old.shutdown()  # open sessions fail over to other servers
        await self.load(span)

    async def close(self) -> None:
        self.state = ServerState.offline
        await asyncio.shield(self.heartbeat_now())
        if self.runtime is not None:
            await self.runtime.shutdown()
        self.compute.shutdown()
        await self.http.aclose()


def blocks_for_memory(config, settings: BlockserverSettings) -> int:
    """How many layers fit in --max-memory (default: half the machine's available memory), with
    their share of the KV-cache budget."""
    dtype = resolve_dtype(settings.dtype, config)
    layer = build_skeleton(config).get_submodule(family_for(config).layers_path)[0]
    layer_bytes = sum(p.numel() for p in layer.parameters()) * dtype.itemsize
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache_bytes = 2 * heads * head_dim * dtype.itemsize * settings.cache_tokens
    budget = (settings.max_memory_gib * 2**30 if settings.max_memory_gib
              else psutil.virtual_memory().available / 2)
    return max(1, min(num_layers(config), math.floor(budget / (layer_bytes + cache_bytes))))
