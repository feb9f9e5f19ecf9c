"""Span choice and rebalancing: the paper's decentralized load balancing, as pure functions.

Every blockserver runs the same computation on the same registry view, so the functions are
deterministic given their inputs (sums in server_id order; randomness only through the `rng`
passed in). The swarm's speed is its weakest layer: the minimum over layers of the summed
throughput of the servers covering it."""

from __future__ import annotations

import random
from dataclasses import dataclass

from shared.records import ServerInfo, ServerState, Span

# Staying wins ties: a server's own window looks (1 + EPS) weaker to it than it is, so it only
# leaves for a strictly better place. Also the "nothing there" threshold.
EPS = 1e-3
MAX_ROUNDS = 100  # best-response rounds in the simulation; they converge in a few


@dataclass(frozen=True)
class Placement:
    """What balancing needs of a server: where it is and how fast it is."""

    server_id: str
    start: int
    length: int
    throughput: float
    online: bool = True  # serving now (a joining server is only a plan)

    @property
    def end(self) -> int:
        return self.start + self.length


def placements(servers: list[ServerInfo]) -> list[Placement]:
    """Servers that count for balancing: online and joining (so simultaneous joiners avoid each other).

    A joining server is not serving yet, so nothing has checked what it claims: it counts with at
    most the median throughput of the online ones (and with the median of the joiners' claims when
    none is online), so that fake joiners claiming huge speeds cannot push real servers away from
    the layers they cover. Gateways list only online servers they could reach."""
    online = sorted(s.throughput for s in servers if s.state == ServerState.online)
    joining = sorted(s.throughput for s in servers if s.state == ServerState.joining)
    typical = online or joining
    cap = typical[len(typical) // 2] if typical else 0.0
    return [Placement(s.server_id, s.start, s.end - s.start,
                      s.throughput if s.state == ServerState.online else min(s.throughput, cap),
                      s.state == ServerState.online)
            for s in servers if s.state != ServerState.offline]


def layer_throughputs(servers: list[Placement], num_layers: int) -> list[float]:
    """Summed throughput of the servers covering each layer, added in server_id order so that
    every server computes bit-identical floats."""
    totals = [0.0] * num_layers
    for s in sorted(servers, key=lambda s: s.server_id):
        for layer in range(s.start, min(s.end, num_layers)):
            totals[layer] += s.throughput
    return totals


def best_start(throughputs: list[float], length: int) -> int:
    """The window of `length` layers whose sorted throughputs are lexicographically smallest:
    it contains the swarm's weakest layer, then its next-weakest... (ties: lowest start)."""
    return min(range(len(throughputs) - length + 1), key=lambda i: (sorted(throughputs[i:i + length]), i))


def choose_span(servers: list[Placement], num_layers: int, num_blocks: int) -> Span:
    """Where a joining server with `num_blocks` layers should go: the swarm's bottleneck."""
    num_blocks = min(num_blocks, num_layers)
    start = best_start(layer_throughputs(servers, num_layers), num_blocks)
    return Span(start, start + num_blocks)


def _move(throughputs: list[float], start: int, length: int, amount: float) -> None:
    for layer in range(start, start + length):
        throughputs[layer] += amount


def _best_response(throughputs: list[float], s: Placement) -> int:
    """Where `s` would go if it left its window (its own window discounted by EPS)."""
    trial = list(throughputs)
    _move(trial, s.start, s.length, -s.throughput * (1 + EPS))
    return best_start(trial, s.length)


def simulate_best_responses(servers: list[Placement], num_layers: int, rng: random.Random) -> list[Placement]:
    """Let servers, in random order, move to their best windows until none moves (or MAX_ROUNDS)."""
    current = {s.server_id: s for s in servers}
    throughputs = layer_throughputs(servers, num_layers)
    for _ in range(MAX_ROUNDS):
        moved = False
        order = sorted(current)
        rng.shuffle(order)
        for server_id in order:
            s = current[server_id]
            start = _best_response(throughputs, s)
            if start != s.start:
                _move(throughputs, s.start, s.length, -s.throughput)
                _move(throughputs, start, s.length, s.throughput)
                current[server_id] = Placement(s.server_id, start, s.length, s.throughput)
                moved = True
        if not moved:
            break
    return list(current.values())


def should_move(me: Placement, servers: list[Placement], num_layers: int, balance_quality: float = 0.75,
                rng: random.Random | None = None) -> Span | None:
    """The new span `me` should move to, or None to stay (PETALS' should_choose_other_blocks).

    Simulates `me` moving to its best window and everyone then best-responding; moves only if the
    swarm's weakest layer would grow enough that current/new < balance_quality, and never if
    leaving would uncover a layer: one that no other server covers, or that no other *online*
    server serves (joining servers, unproven, cannot lure a serving one away)."""
    rng = rng or random.Random()
    others = [s for s in servers if s.server_id != me.server_id]
    throughputs = layer_throughputs(others + [me], num_layers)
    initial = min(throughputs)
    without_me = list(throughputs)
    _move(without_me, me.start, me.length, -me.throughput * (1 + EPS))
    if initial > EPS and min(without_me) <= 0:
        return None  # I am the only server of some layer
    serving = layer_throughputs([s for s in others if s.online], num_layers)
    if me.online and min(serving[me.start:me.end]) <= 0:
        return None  # I am the only online server of some layer of mine
    start = best_start(without_me, me.length)
    if start == me.start:
        return None
    moved = Placement(me.server_id, start, me.length, me.throughput)
    settled = simulate_best_responses(others + [moved], num_layers, rng)
    new = min(layer_throughputs(settled, num_layers))
    if new < initial or new < EPS:
        return None
    if initial / new < balance_quality - EPS:
        return Span(start, start + me.length)
    return None


def swarm_throughput(servers: list[Placement], num_layers: int) -> float:
    """The swarm's speed: its weakest layer's summed throughput."""
    return min(layer_throughputs(servers, num_layers))
