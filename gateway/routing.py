"""Choosing the fastest chain of servers over a range of a model's layers (PETALS' min-latency
routing, plus the current load of each server). Pure: records, RTTs and loads in, hops out.

A chain is a shortest path over states (layer boundary, previous server): entering server s at
layer p and leaving at q costs the network delay from the previous server (or the gateway) to s,
a per-hop overhead plus (q - p) layers of compute at s's decode speed, plus what each session
already open on s adds (a batching server runs them together: one more session costs the marginal
time measured between 1 and 16 batched sessions, not a whole step, plus the wait for the tick in
progress), and a large
penalty when s lacks the KV-cache room the session needs. Since layer indices only grow, the search is a dynamic programme over boundaries
in increasing order."""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import Unavailable
from shared.records import ServerInfo, Span

# Bounds that keep a route a few milliseconds even over a registry of thousands of records: from
# each layer, the cheapest MAX_CANDIDATES servers covering it, and the cheapest MAX_STATES partial
# chains arriving there. Swarms with fewer servers per layer are searched exhaustively.
MAX_CANDIDATES = 12
MAX_STATES = 12


@dataclass(frozen=True)
class Hop:
    """One link of a chain: a server, and the layers of its span the chain runs there."""

    server: ServerInfo
    span: Span


@dataclass(frozen=True)
class RoutingCosts:
    """Tunables of the route cost, in seconds."""

    hop_overhead_s: float = 0.005  # serialization and scheduling per hop
    unknown_rtt_s: float = 0.3  # when nothing is measured yet (PETALS: 0.15 s one-way)
    unknown_tokens_per_s: float = 300.0  # a server that announced no decode speed
    tie_s: float = 0.010  # routes closer than this are equally good: RTTs measured on busy hosts are noisier
    cache_penalty_s: float = 10.0  # a server without room for the session's cache
    max_delay_s: float = 5.0  # one link never counts for more (a bad measurement must not dominate)


def link_delay(rtt_s: float | None, rtts: Mapping[str, float], costs: RoutingCosts) -> float:
    """One-way delay of a link: half its RTT; unmeasured links are assumed typical of the others."""
    if rtt_s is None:
        known = sorted(rtts.values())
        rtt_s = known[len(known) // 2] if known else costs.unknown_rtt_s
    return min(rtt_s / 2, costs.max_delay_s)


def marginal(server: ServerInfo, alone_s: float) -> float:
    """Seconds per layer that one more session adds to a server's tick."""
    batched = server.batch_decode_tokens_per_s
    if not batched:
        return alone_s  # no batching measured: sessions take turns
    tick_of_16 = 16 / batched
    return max(0.0, (tick_of_16 - alone_s) / 15)


def route_chain(servers: list[ServerInfo], num_layers: int, banned: frozenset[str] | set[str] = frozenset(),
                rtts: Mapping[str, float] | None = None, load: Mapping[str, int] | None = None,
                costs: RoutingCosts = RoutingCosts(), rng: random.Random | None = None, start: int = 0,
                end: int | None = None, cache_tokens: int = 0) -> list[Hop]:
    """The cheapest chain of hops tiling layers [start, end) (default: the whole model).

    `rtts`: gateway -> server round trips (s); `load`: sessions this gateway has open per server.
    A hop may enter a server's span in the middle and leave it at `end`. `cache_tokens` is the
    room the session needs on each server. Ties are broken at random, so that equal replicas
    share the load."""
    end = num_layers if end is None else end
    rng = rng or random.Random()
    rtts, load = rtts or {}, load or {}
    usable = [s for s in servers if s.server_id not in banned and s.end <= num_layers]

    def sessions(s: ServerInfo) -> int:
        # the heartbeat counts every gateway's sessions but is seconds old; ours are exact
        return max(s.sessions, load.get(s.server_id, 0))

    # Per server, seconds per layer for one more session: its own work, plus, when it is busy, the
    # tick in progress (half of one, on average) and each session's marginal share, so that equal
    # replicas share the load
    per_layer: dict[str, float] = {}
    for s in usable:
        alone = 1 / (s.decode_tokens_per_s or costs.unknown_tokens_per_s)
        busy = sessions(s)
        per_layer[s.server_id] = alone + (alone / 2 if busy else 0.0) + busy * marginal(s, alone)

    # what a hop there costs besides its layers and the link into it: overhead and a cache penalty
    hop = {s.server_id: costs.hop_overhead_s + (costs.cache_penalty_s if s.cache_tokens_left < cache_tokens else 0.0)
           for s in usable}
    entered = {i: cost + link_delay(rtts.get(i), rtts, costs) for i, cost in hop.items()}  # from the gateway

    def candidates(position: int) -> list[ServerInfo]:
        """The servers covering `position` worth trying from it: all of them in a swarm of usual
        size, the MAX_CANDIDATES cheapest per layer (with the hop's own costs and its link from the
        gateway spread over the layers it runs) in a registry of thousands."""
        covering = [s for s in usable if s.start <= position < s.end]
        if len(covering) <= MAX_CANDIDATES:
            return covering
        return heapq.nsmallest(MAX_CANDIDATES, covering, key=lambda s: per_layer[s.server_id]
                               + entered[s.server_id] / (min(s.end, end) - position))

    # best[(p, previous server id)] = (cost, tiebreak, hops so far)
    best: dict[tuple[int, str | None], tuple[float, float, list[Hop]]] = {(start, None): (0.0, 0.0, [])}
    for position in range(start, end):
        arrived = sorted((v for k, v in best.items() if k[0] == position), key=lambda v: v[:2])[:MAX_STATES]
        if not arrived:
            continue
        servers_here = candidates(position)
        for (cost, _, hops) in arrived:
            previous = hops[-1].server if hops else None
            for s in servers_here:
                leave = min(s.end, end)
                rtt = rtts.get(s.server_id) if previous is None else previous.next_pings.get(
                    s.server_id, rtts.get(s.server_id))
                total = cost + link_delay(rtt, rtts, costs) + hop[s.server_id] + (leave - position) * per_layer[
                    s.server_id]
                key = (leave, s.server_id)
                candidate = (total, rng.random(), hops + [Hop(s, Span(position, leave))])
                if key not in best or candidate[:2] < best[key][:2]:
                    best[key] = candidate
    whole_model = start == 0 and end == num_layers

    def back_to_gateway(hops: list[Hop]) -> float:
        # only a chain over the whole model returns its output to the gateway from its last hop; a
        # replacement for a middle range hands it to the next hop, whose link is already known
        return link_delay(rtts.get(hops[-1].server.server_id), rtts, costs) if whole_model else 0.0

    finals = [(cost + back_to_gateway(hops), tie, hops) for (p, _), (cost, tie, hops) in best.items()
              if p == end and hops]
    if not finals:
        uncovered = [p for p in range(start, end) if not any(s.start <= p < s.end for s in usable)]
        where = f"layers {uncovered[0]}..{uncovered[-1]}" if uncovered else "a contiguous chain"
        raise Unavailable(f"no online server covers {where} (of [{start}, {end}))")
    # Among routes as good as the best within measurement noise, take the least loaded, so that
    # concurrent sessions spread over equal replicas even when batching makes load nearly free.
    cheapest = min(f[0] for f in finals)
    near = [f for f in finals if f[0] <= cheapest + costs.tie_s]
    return min(near, key=lambda f: (sum(sessions(h.server) for h in f[2]), f[1]))[2]
