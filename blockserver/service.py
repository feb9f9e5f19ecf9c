"""A blockserver's life: measure itself, choose its span from the swarm (or take --blocks), announce
`joining`, load, announce `online`, and move when the swarm would be faster with it elsewhere."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
from pathlib import Path

import httpx
import psutil
import torch
from pydantic import ValidationError

from blockserver.metrics import BlockserverMetrics
from blockserver.runtime import Runtime
from blockserver.settings import BlockserverSettings
from blockserver.throughput import Throughput, measure
from shared import corolla_version
from shared.balancing import Placement, choose_span, placements, should_move
from shared.compute import ComputeThread
from shared.dtypes import resolve_dtype
from shared.identity import HEARTBEAT, Identity, read_token
from shared.loops import TaskSet, every
from shared.models.compiled import FIXED_BYTES, compiled_extra_bytes, not_compilable, refusal
from shared.models.loader import ModelFacts, family_for, layer_bytes, load_facts, load_span
from shared.models.quant import check_quant
from shared.models.resolve import DEFAULT_CACHE_DIR, resolve_model, served_name
from shared.records import HEARTBEAT_PATH, SERVERS_PATH, ServerInfo, ServerState, Span
from shared.rtt import RoundTrips

log = logging.getLogger(__name__)
QUIET_START_S = 60.0  # a gateway that does not answer yet is still starting, not news


class GatewayLink:
    """What this server knows of one gateway it heartbeats to, so that each change is logged once."""

    def __init__(self, url: str):
        self.url = url
        self.accepted = False  # has taken a heartbeat at least once
        self.trouble: str | None = None  # the last problem logged
        self.gateway_key: str | None = None  # its public key, from its answers: it signs the sessions it grants


class Blockserver:
    def __init__(self, settings: BlockserverSettings, url: str):
        self.settings, self.url = settings, url
        self.identity = Identity.load_or_create(settings.identity_file)
        self.server_id = settings.server_id or self.identity.id
        self.compute = ComputeThread("compute", settings.num_threads)
        self.fixed_span = settings.blocks
        self.span: Span | None = None
        self.metrics = BlockserverMetrics(self)
        self.state = ServerState.joining
        self.runtime: Runtime | None = None
        self.throughput: Throughput | None = None
        self.model_name = ""
        self.facts: ModelFacts | None = None
        self.next_pings = RoundTrips()
        self.swarm: list[ServerInfo] = []  # the registry's view, refreshed in the background
        self.links = {g: GatewayLink(g) for g in settings.gateways}
        self.started_at = time.monotonic()
        # The swarm secret never leaves this process: heartbeats and registry reads carry HMACs of it.
        self.http = httpx.AsyncClient(timeout=max(2.0, settings.heartbeat_interval_s))
        self.peers = httpx.AsyncClient(timeout=2.0)

    def trusted_gateways(self) -> set[str] | None:
        """Public keys whose grants open sessions here; None: this server serves no gateway (a
        test's, or verify-model's), so it needs no grants."""
        if not self.links:
            return None
        return {link.gateway_key for link in self.links.values() if link.gateway_key}

    @property
    def fingerprint(self) -> str:
        return self.facts.fingerprint if self.facts else ""

    # ---- what we announce
    def info(self) -> ServerInfo | None:
        if self.span is None or self.facts is None:
            return None  # nothing to announce before a span is chosen
        runtime, tp = self.runtime, self.throughput
        return ServerInfo(
            server_id=self.server_id, url=self.url, model=self.fingerprint, model_name=self.model_name,
            start=self.span.start, end=self.span.end, state=self.state, throughput=self.announced_throughput(),
            decode_tokens_per_s=tp.decode_tokens_per_s if tp else 0.0,
            batch_decode_tokens_per_s=tp.batch_decode_tokens_per_s if tp else 0.0,
            prefill_tokens_per_s=tp.prefill_tokens_per_s if tp else 0.0,
            network_tokens_per_s=tp.network_tokens_per_s if tp else 0.0,
            cache_tokens_left=runtime.cache_tokens_left if runtime else self.settings.cache_tokens,
            cache_tokens=self.settings.cache_tokens, sessions=len(runtime.open_sessions()) if runtime else 0,
            dtype=runtime.layers.dtype_name if runtime else self.settings.dtype, quant=self.settings.quant,
            version=corolla_version(),
            next_pings=dict(self.next_pings.seconds), ttl_s=3 * self.settings.heartbeat_interval_s)

    def announced_throughput(self) -> float:
        if self.settings.throughput is not None:
            return self.settings.throughput
        if self.throughput is None or self.span is None:
            return 1.0
        return self.throughput.announced(len(self.span))

    # ---- start-up
    async def start(self) -> None:
        s = self.settings
        check_quant(s.quant, s.device)  # before minutes of conversion and measurement
        directory = await self.compute.run(resolve_model, s.model, s.cache_dir)  # may convert: torch work
        self.facts = await self.compute.run(load_facts, directory)
        self.model_name = s.model_name or served_name(s.model, directory)
        log.info("blockserver %s: model %s, fingerprint %s", self.server_id, self.model_name, self.fingerprint)
        if s.throughput is None:
            cache = Path(s.cache_dir or DEFAULT_CACHE_DIR) / "throughput.json"
            self.throughput = await self.compute.run(measure, directory, s.device, s.dtype, cache, s.quant)
        if self.fixed_span is not None:
            span = self.fixed_span
        else:
            await asyncio.sleep(random.uniform(0, s.join_delay_s))  # simultaneous joiners see each other
            span = await self.choose()
        await self.load(span)

    async def _compile(self, loaded, span: Span) -> None:
        """Compile the span's decode step before serving it; a span that cannot be compiled runs eagerly."""
        refusal = not_compilable(loaded)
        if refusal:
            log.info("blockserver %s: decode steps run eagerly (%s)", self.server_id, refusal)
            return
        started = time.monotonic()

        def progress(rows: int) -> None:
            print(f"blockserver {self.server_id}: compiling the decode step of layers {span} for {rows} row(s) "
                  f"({time.monotonic() - started:.0f}s; once per start, --no-compile skips it)", file=sys.stderr,
                  flush=True)

        try:
            await self.compute.run(loaded.compile_decode, progress)
        except Exception as exc:  # a compiler that fails here must not keep the span from serving
            log.warning("blockserver %s: compiling the decode step failed (%s: %s); steps run eagerly",
                        self.server_id, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return
        log.info("blockserver %s: decode step compiled in %.0fs (row buckets %s)", self.server_id,
                 time.monotonic() - started, list(loaded.compiled.buckets))

    def start_loops(self, tasks: TaskSet) -> None:
        """Heartbeats (one timer per gateway, so a silent gateway delays no other), registry reads,
        peer pings and rebalancing: each supervised and on its own schedule."""
        interval = self.settings.heartbeat_interval_s
        for link in self.links.values():
            tasks.start(every(f"heartbeat to {link.url}", interval, lambda link=link: self.send_heartbeat(link)),
                        f"heartbeat {link.url}")
        tasks.start(every("registry read", interval, self.fetch_swarm, first_delay_s=interval), "registry")
        tasks.start(every("next pings", interval, self.ping_next, first_delay_s=interval), "pings")

    def start_rebalancing(self, tasks: TaskSet) -> None:
        period = self.settings.balance_period_s
        tasks.start(every("rebalance", lambda: random.uniform(0, 2 * period), self.rebalance_once,
                          first_delay_s=random.uniform(0, 2 * period)), "rebalance")

    async def choose(self) -> Span:
        layers = self.settings.num_blocks or await self.compute.run(layers_for_memory, self.facts, self.settings)
        swarm = [p for p in placements(await self.fetch_swarm()) if p.server_id != self.server_id]
        span = choose_span(swarm, self.facts.num_layers, layers)
        log.info("blockserver %s chose layers %s (%d layers) from %d servers", self.server_id, span, layers,
                 len(swarm))
        return span

    async def load(self, span: Span) -> None:
        self.span, self.state = span, ServerState.joining
        await self.heartbeat_now()  # joining: others plan around us while we load

        started = last = time.monotonic()

        def progress(done: int, total: int) -> None:  # about once a second, and when done
            nonlocal last
            now = time.monotonic()
            if done == total or now - last >= 1.0:
                last = now
                print(f"blockserver {self.server_id}: loading layers {span}: {done}/{total} "
                      f"({now - started:.1f}s)", file=sys.stderr, flush=True)

        loaded = await self.compute.run(load_span, self.facts.directory, span.start, span.end, self.settings.device,
                                        self.settings.dtype, progress, self.settings.quant)
        s = self.settings
        loaded.batch_invariant = s.batch_invariant
        if s.compile:
            await self._compile(loaded, span)
        self.runtime = Runtime(loaded, s.cache_tokens, self.compute, s.prefill_chunk_tokens, s.cache_page_tokens,
                               s.alloc_timeout_s, s.batch_linger_s)
        self.metrics.attach(self.runtime)
        self.state = ServerState.online
        await self.heartbeat_now()
        log.info("blockserver %s serving %s layers %s at %s", self.server_id, self.model_name, span, self.url)

    # ---- the registry
    async def fetch_swarm(self) -> list[ServerInfo]:
        """Live records of our model from the first gateway that answers with a valid list. A bad
        answer (HTML from a proxy, a record that fails validation) is logged and skipped."""
        for gateway in self.settings.gateways:
            try:
                response = await self.http.get(f"{gateway}{SERVERS_PATH}", headers=read_token(self.settings.swarm_secret))
                if response.status_code != 200:
                    continue
                body = response.json()
                if not isinstance(body, list):
                    raise ValueError("not a list of records")
            except httpx.HTTPError:
                continue
            except ValueError as exc:
                log.warning("gateway %s sent an unreadable registry (%s); asking another", gateway, exc)
                continue
            records = []
            for raw in body:
                try:
                    record = ServerInfo.model_validate(raw)
                except ValidationError:
                    continue  # one bad record must not hide the others
                if record.model == self.fingerprint:
                    records.append(record)
            self.swarm = records
            return records
        return self.swarm

    async def heartbeat_now(self, quiet: bool = False) -> None:
        await asyncio.gather(*(self.send_heartbeat(link, quiet) for link in self.links.values()))

    async def send_heartbeat(self, link: GatewayLink, quiet: bool = False) -> None:
        """One heartbeat to one gateway. `quiet`: the last one, at shutdown; a gateway that stopped
        with us is not news."""
        info = self.info()
        if info is None:
            return
        try:
            envelope = self.identity.sign(HEARTBEAT, info.model_dump(mode="json"), self.settings.swarm_secret)
            response = await self.http.post(f"{link.url}{HEARTBEAT_PATH}", json=envelope)
        except httpx.HTTPError as exc:
            if not quiet:
                self._trouble(link, f"unreachable ({type(exc).__name__})")
            return
        if response.status_code == 200:
            try:
                key = response.json().get("gateway_key")
            except (ValueError, AttributeError):
                key = None
            if isinstance(key, str) and key != link.gateway_key:
                link.gateway_key = key  # its grants are honoured from now on
            if link.trouble or not link.accepted:
                log.info("blockserver %s registered with gateway %s", self.server_id, link.url)
            link.accepted, link.trouble = True, None
        elif response.status_code == 409:
            self._trouble(link, _detail(response), always=True)
        elif response.status_code == 503:
            self._trouble(link, "still loading its model")
        else:
            self._trouble(link, f"refused the heartbeat: {response.status_code} {_detail(response)}", always=True)

    def _trouble(self, link: GatewayLink, problem: str, always: bool = False) -> None:
        """Log a gateway's problem once (not every heartbeat). While the gateway was never reached
        and the server is young, it is probably still starting: stay quiet."""
        if problem == link.trouble:
            return
        starting = not link.accepted and time.monotonic() - self.started_at < QUIET_START_S
        if always or not starting:
            link.trouble = problem
            log.warning("gateway %s: %s", link.url, problem)

    async def ping_next(self) -> None:
        """RTTs to the servers a chain may go to after us (those covering our span's end)."""
        if self.span is None:
            return
        candidates = [s for s in self.swarm if s.server_id != self.server_id and s.start <= self.span.end < s.end]
        await self.next_pings.measure(self.peers, {s.server_id: s.url for s in candidates[:5]})
        self.next_pings.keep_only({s.server_id for s in self.swarm})

    # ---- rebalancing
    async def rebalance_once(self) -> None:
        if self.state != ServerState.online or self.span is None:
            return
        swarm = placements(await self.fetch_swarm())
        me = Placement(self.server_id, self.span.start, len(self.span), self.announced_throughput())
        target = should_move(me, [p for p in swarm if p.server_id != self.server_id] + [me], self.facts.num_layers,
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
        await asyncio.shield(self.heartbeat_now(quiet=True))
        if self.runtime is not None:
            await self.runtime.shutdown()
        self.compute.shutdown()
        await self.http.aclose()
        await self.peers.aclose()


def _detail(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def layers_for_memory(facts: ModelFacts, settings: BlockserverSettings) -> int:
    """How many layers fit in --max-memory (default: half the machine's available memory), each with
    its weights as --quant stores them and its share of the KV-cache budget (the family's real KV
    bytes per token, in the compute dtype: the cache is never quantized)."""
    dtype = resolve_dtype(settings.dtype, facts.config)
    weights = layer_bytes(facts.config, dtype, settings.quant)
    per_layer = weights + facts.kv_bytes_per_token(dtype) * settings.cache_tokens
    budget = (settings.max_memory_gib * 2**30 if settings.max_memory_gib
              else psutil.virtual_memory().available / 2)
    device = torch.device(settings.device).type
    if settings.compile and refusal(family_for(facts.config).name, settings.quant, device) is None:
        per_layer += compiled_extra_bytes(weights)  # the compiled graphs' prepacked weights
        budget -= FIXED_BYTES
    return max(1, min(facts.num_layers, math.floor(budget / per_layer)))
