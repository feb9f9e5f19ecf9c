"""Choosing a chain of servers that covers a range of a model's layers."""

from __future__ import annotations

import random
from dataclasses import dataclass

from shared.errors import Unavailable
from shared.records import ServerInfo, Span


@dataclass(frozen=True)
class Hop:
    """One link of a chain: a server, and the layers of its span the chain runs there."""

    server: ServerInfo
    span: Span


def route_chain(servers: list[ServerInfo], num_layers: int, banned: frozenset[str] | set[str] = frozenset(),
                rng: random.Random | None = None, start: int = 0, end: int | None = None) -> list[Hop]:
    """A chain of hops that tiles layers [start, end) (default: the whole model) with the fewest hops.

    A hop may enter a server's span in the middle and leave it at `end`. Among chains of equal
    length, prefer servers with fewer open sessions, then pick at random (so replicas share load)."""
    end = num_layers if end is None else end
    rng = rng or random.Random()
    usable = [s for s in servers if s.server_id not in banned and s.end <= num_layers]
    # best[p]: (hops, load, tiebreak, first hop) of the best chain from layer p to `end`
    best: dict[int, tuple[int, int, float, Hop | None]] = {end: (0, 0, 0.0, None)}
    for position in range(end - 1, start - 1, -1):
        options = []
        for s in usable:
            if s.start <= position < s.end:
                leave = min(s.end, end)
                if leave in best:
                    hops, load, _, _ = best[leave]
                    options.append((hops + 1, load + s.sessions, rng.random(), Hop(s, Span(position, leave))))
        if options:
            best[position] = min(options, key=lambda o: o[:3])
    if start not in best:
        uncovered = [p for p in range(start, end) if not any(s.start <= p < s.end for s in usable)]
        raise Unavailable(f"no online server covers layers {uncovered[0]}..{uncovered[-1]} "
                          f"(of [{start}, {end}))")
    chain, position = [], start
    while position < end:
        hop = best[position][3]
        chain.append(hop)
        position = hop.span.end
    return chain
