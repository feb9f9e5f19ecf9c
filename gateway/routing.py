"""Choosing a chain of servers that covers every layer of a model."""

from __future__ import annotations

import random

from shared.errors import Unavailable
from shared.records import ServerInfo


def route_chain(servers: list[ServerInfo], num_layers: int, banned: frozenset[str] | set[str] = frozenset(),
                rng: random.Random | None = None) -> list[ServerInfo]:
    """A chain of servers whose spans tile [0, num_layers) with the fewest hops.

    Among chains of equal length, prefer servers with fewer open sessions, then pick at random
    (so that replicas share the load)."""
    rng = rng or random.Random()
    usable = [s for s in servers if s.server_id not in banned and s.end <= num_layers]
    # best[p]: (hops, load, tiebreak, first server) of the best chain from layer p to the end
    best: dict[int, tuple[int, int, float, ServerInfo | None]] = {num_layers: (0, 0, 0.0, None)}
    for position in range(num_layers - 1, -1, -1):
        options = [(best[s.end][0] + 1, best[s.end][1] + s.sessions, rng.random(), s)
                   for s in usable if s.start == position and s.end in best]
        if options:
            best[position] = min(options, key=lambda o: o[:3])
    if 0 not in best:
        uncovered = [p for p in range(num_layers) if not any(s.start <= p < s.end for s in usable)]
        where = f"layers {uncovered[0]}..{uncovered[-1]} have no server" if uncovered else "spans do not line up"
        raise Unavailable(f"no chain of online servers covers all {num_layers} layers ({where})")
    chain, position = [], 0
    while position < num_layers:
        server = best[position][3]
        chain.append(server)
        position = server.end
    return chain
