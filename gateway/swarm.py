"""The gateway's view of the swarm, with one owner: the registry of records, bans, measured RTTs,
this gateway's own sessions per server, and failover counts. Routes, the chain and the views all
go through it."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

from gateway.bans import Bans
from gateway.registry import Registry, coverage
from gateway.routing import Hop, RoutingCosts, route_chain
from shared.balancing import layer_throughputs, placements
from shared.errors import ModelMismatch
from shared.records import ServerInfo, ServerState
from shared.rtt import RoundTrips

log = logging.getLogger(__name__)


@dataclass
class FailoverStats:
    failures: int = 0  # hops that failed mid-session
    recoveries: int = 0  # failures repaired by a replacement
    given_up: int = 0  # failures with no replacement before the deadline
    moves: int = 0  # hops moved without a fault (a full cache, a refusal, an expired session)
    preemptions: int = 0  # generations that ran out of room, waited and were recomputed


@dataclass(frozen=True)
class ServedModel:
    """Which model this gateway serves: its fingerprint (what servers must match) and its names."""

    fingerprint: str
    name: str  # the API's model id (an alias)
    num_layers: int

    def describe(self) -> str:
        return f"{self.name} (fingerprint {self.fingerprint})"


class Lease:
    """One session of this gateway on one server, counted from routing to close. Releasing is
    synchronous and idempotent, so that cleanup that gets cancelled still gives the count back."""

    def __init__(self, load: dict[str, int], server_id: str):
        self._load, self.server_id = load, server_id
        load[server_id] = load.get(server_id, 0) + 1
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._load[self.server_id] -= 1
            if not self._load[self.server_id]:
                del self._load[self.server_id]


class Swarm:
    def __init__(self, ban_s: float = 15.0, costs: RoutingCosts | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None):
        self.registry = Registry(clock)
        self.bans = Bans(ban_s, clock=clock)
        self.rtts = RoundTrips()
        self.load: dict[str, int] = {}  # sessions this gateway has open on each server
        self.failovers = FailoverStats()
        self.costs = costs or RoutingCosts()
        self.model: ServedModel | None = None  # set once the gateway's model is loaded
        self._rng = rng or random.Random()
        self._mismatches_logged: set[str] = set()
        self.verifier = None  # gateway.verify.Verifier with --verify-rate above 0 (the app sets it)
        # signs this gateway's grant for a session on a server (gateway.membership; the app sets it)
        self.grant: Callable[..., dict | None] = lambda server_id, session_id="*": None

    # ---- records
    def heartbeat(self, info: ServerInfo) -> bool:
        """Take a heartbeat; True when the server is newly online (worth a first ping at once).
        A record of another model is refused with ModelMismatch, logged once per server."""
        model = self.model
        if model is not None and info.model != model.fingerprint:
            message = (f"blockserver {info.server_id} at {info.url} serves {info.model_name or '?'} (fingerprint "
                       f"{info.model}), but this gateway serves {model.describe()}")
            if info.server_id not in self._mismatches_logged:
                self._mismatches_logged.add(info.server_id)
                log.warning("refused: %s", message)
            raise ModelMismatch(message)
        before = self.registry.get(info.server_id)
        self.registry.heartbeat(info)
        return info.state == ServerState.online and (before is None or before.state != ServerState.online)

    def records(self) -> list[ServerInfo]:
        """Every live record of our model, any state."""
        if self.model is None:
            return []
        return self.registry.servers(self.model.fingerprint)

    def members(self) -> list[ServerInfo]:
        """What blockservers plan with (span choice, rebalancing, next-hop pings): joining records,
        and online ones this gateway has reached and not banned. A record whose URL answers nobody,
        or whose results were wrong, must not steer where real servers go."""
        banned = self.bans.active()
        return [s for s in self.records() if s.state == ServerState.joining
                or (s.server_id in self.rtts.seconds and s.server_id not in banned)]

    def online(self) -> list[ServerInfo]:
        return [s for s in self.records() if s.state == ServerState.online]

    # ---- routing
    def route(self, start: int = 0, end: int | None = None, cache_tokens: int = 0,
              exclude: set[str] = frozenset()) -> list[Hop]:
        """The cheapest chain over [start, end) among online servers that are not banned nor in `exclude`."""
        assert self.model is not None, "route() before the model is loaded"
        return route_chain(self.online(), self.model.num_layers, self.bans.active() | exclude, rtts=self.rtts.seconds,
                           load=self.load, costs=self.costs, rng=self._rng, start=start, end=end,
                           cache_tokens=cache_tokens)

    def routable(self) -> list[ServerInfo]:
        banned = self.bans.active()
        return [s for s in self.online() if s.server_id not in banned]

    def largest_session(self) -> int:
        """The most cache tokens one session can hold on every server of some route: per layer the
        largest budget among routable servers covering it, then the smallest over layers
        (0 when a layer has no routable server; servers that announce no budget count as unbounded)."""
        if self.model is None:
            return 0
        best = [0] * self.model.num_layers
        for s in self.routable():
            budget = s.cache_tokens or 2**62
            for layer in range(s.start, min(s.end, self.model.num_layers)):
                best[layer] = max(best[layer], budget)
        return min(best, default=0)

    def lease(self, server_id: str) -> Lease:
        return Lease(self.load, server_id)

    def ban(self, server_id: str) -> float:
        return self.bans.ban(server_id)

    # ---- measurements
    async def ping(self, client: httpx.AsyncClient, servers: list[ServerInfo] | None = None) -> None:
        """Measure the RTT to `servers` (default: every online one; others' RTTs are forgotten)."""
        everyone = servers is None
        servers = self.online() if everyone else servers
        await self.rtts.measure(client, {s.server_id: s.url for s in servers})
        if everyone:
            self.rtts.keep_only({s.server_id for s in servers})

    # ---- views
    def coverage(self, routable_only: bool = False) -> list[int]:
        """Servers per layer: online ones, or only those not banned."""
        if self.model is None:
            return []
        return coverage(self.routable() if routable_only else self.online(), self.model.num_layers)

    def snapshot(self) -> dict:
        """The swarm as /v1/swarm shows it."""
        model = self.model
        records = self.records()
        banned = self.bans.active()
        counts = self.coverage()
        throughput = layer_throughputs(placements(self.online()), model.num_layers)
        return {
            "model": model.name, "fingerprint": model.fingerprint, "num_layers": model.num_layers,
            "servers": [{
                "server_id": s.server_id, "url": s.url, "start": s.start, "end": s.end, "state": s.state.value,
                "throughput": s.throughput, "decode_tokens_per_s": s.decode_tokens_per_s,
                "cache_tokens_left": s.cache_tokens_left, "sessions": s.sessions,
                "gateway_sessions": self.load.get(s.server_id, 0), "dtype": s.dtype, "quant": s.quant,
                "rtt_ms": round(self.rtts.seconds[s.server_id] * 1000, 2) if s.server_id in self.rtts.seconds
                else None,
                "next_rtt_ms": {peer: round(rtt * 1000, 2) for peer, rtt in s.next_pings.items()},
                "banned": s.server_id in banned, "version": s.version,
            } for s in records],
            "coverage": counts, "layer_throughput": throughput,
            "missing_layers": [i for i, c in enumerate(counts) if c == 0],
            "failover": asdict(self.failovers),
            "verification": asdict(self.verifier.stats) if self.verifier is not None else None,
        }
