"""Choosing the fastest chain of servers over a range of a model's layers (PETALS' min-latency
routing, plus the current load of each server).

A chain is a shortest path over states (layer boundary, previous server): entering server s at
layer p and leaving at q costs the network delay from the previous server (or the gateway) to s,
a per-hop overhead plus (q - p) layers of compute at s's decode speed, that work again for each
session already open on s (they share it), and a large penalty when s lacks the KV-cache room the session needs. Since layer indices
only grow, the search is a dynamic programme over boundaries in increasing order."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from shared.errors import Unavailable
from shared.records import ServerInfo, Span


@dataclass(frozen=True)
class Hop:
    """One link of a chain: a server, and the layers of its span the chain runs there."""

    server: ServerInfo
    span: Span


@dataclass
class Costs:
    """What routing knows beyond the records: measured RTTs and this gateway's own sessions."""

    rtts: dict[str, float] = field(default_factory=dict)  # gateway -> server round trip, seconds
    load: dict[str, int] = field(default_factory=dict)  # sessions this gateway has open on each server
    hop_overhead_s: float = 0.005  # serialization and scheduling per hop
    unknown_rtt_s: float = 0.3  # when nothing is measured yet (PETALS: 0.15 s one-way)
    unknown_rps: float = 300.0  # a server that announced no decode speed
    cache_penalty_s: float = 10.0  # a server without room for the session's cache

    def delay(self, rtt: float | None) -> float:
        if rtt is None:  # not measured yet: assume it is like the others
            known = sorted(self.rtts.values())
            rtt = known[len(known) // 2] if known else self.unknown_rtt_s
        return min(rtt / 2, 5.0)

    def sessions(self, server: ServerInfo) -> int:
        # the heartbeat counts every gateway's sessions but is seconds old; ours are exact
        return max(server.sessions, self.load.get(server.server_id, 0))


def route_chain(servers: list[ServerInfo], num_layers: int, banned: frozenset[str] | set[str] = frozenset(),
                rng: random.Random | None = None, start: int = 0, end: int | None = None,
                costs: Costs | None = None, cache_tokens: int = 0) -> list[Hop]:
    """The cheapest chain of hops tiling layers [start, end) (default: the whole model).

    A hop may enter a server's span in the middle and leave it at `end`. `cache_tokens` is the
    room the session needs on each server (batch x max_length). Ties are broken at random, so
    that equal replicas share the load."""
    end = num_layers if end is None else end
    rng = rng or random.Random()
    costs = costs or Costs()
    usable = [s for s in servers if s.server_id not in banned and s.end <= num_layers]
    # best[(p, previous server id)] = (cost, tiebreak, hops so far)
    best: dict[tuple[int, str | None], tuple[float, float, list[Hop]]] = {(start, None): (0.0, 0.0, [])}
    for position in range(start, end):
        for (cost, _, hops) in [v for k, v in best.items() if k[0] == position]:
            previous = hops[-1].server if hops else None
            for s in usable:
                if not s.start <= position < s.end:
                    continue
                leave = min(s.end, end)
                link = costs.delay(costs.rtts.get(s.server_id) if previous is None
                                   else previous.next_pings.get(s.server_id, costs.rtts.get(s.server_id)))
                work = costs.hop_overhead_s + (leave - position) / (s.inference_rps or costs.unknown_rps)
                queue = costs.sessions(s) * work  # each open session's step runs before ours, roughly
                penalty = costs.cache_penalty_s if s.cache_tokens_left < cache_tokens else 0.0
                total = cost + link + work + queue + penalty
                key = (leave, s.server_id)
                candidate = (total, rng.random(), hops + [Hop(s, Span(position, leave))])
                if key not in best or candidate[:2] < best[key][:2]:
                    best[key] = candidate
    finals = [(cost + (costs.delay(costs.rtts.get(hops[-1].server.server_id)) if start == 0 and end == num_layers
                       else 0.0), tie, hops)
              for (p, _), (cost, tie, hops) in best.items() if p == end and hops]
    if not finals:
        uncovered = [p for p in range(start, end) if not any(s.start <= p < s.end for s in usable)]
        raise Unavailable(f"no online server covers layers {uncovered[0]}..{uncovered[-1]} "
                          f"(of [{start}, {end}))")
    return min(finals, key=lambda f: f[:2])[2]
