"""Simulated swarms of heterogeneous servers joining and leaving: the throughput that span choice
and rebalancing reach (shared/balancing.py, the code the blockservers run), as a fraction of the
optimum computed exactly by enumerating every placement (instances are small enough for that).

    python bench/balance_sim.py [--instances 300] [--seed 0]

The swarm's throughput is its weakest layer's summed server throughput. Phases per instance:
servers join one by one (each choosing its span from what it sees); then they rebalance; then a
random server leaves and the rest rebalance again."""

from __future__ import annotations

import argparse
import itertools
import random
import statistics

from shared.balancing import Placement, choose_span, should_move, swarm_throughput


def optimum(servers: list[Placement], num_layers: int) -> float:
    best = 0.0
    ranges = [range(num_layers - s.length + 1) for s in servers]
    for starts in itertools.product(*ranges):
        placed = [Placement(s.server_id, st, s.length, s.throughput) for s, st in zip(servers, starts)]
        best = max(best, swarm_throughput(placed, num_layers))
    return best


def rebalance(servers: list[Placement], num_layers: int, rng: random.Random, rounds: int = 20) -> list[Placement]:
    """Every server runs its periodic check (in random order) until a round passes without a move."""
    servers = list(servers)
    for _ in range(rounds):
        moved = False
        for i in rng.sample(range(len(servers)), len(servers)):
            span = should_move(servers[i], servers, num_layers, rng=rng)
            if span is not None:
                s = servers[i]
                servers[i] = Placement(s.server_id, span.start, s.length, s.throughput)
                moved = True
        if not moved:
            break
    return servers


def instance(rng: random.Random) -> tuple[int, list[Placement]] | None:
    num_layers = rng.randint(6, 10)
    n = rng.randint(3, 6)
    joiners = []
    for i in range(n):
        length = rng.randint(max(1, num_layers // 4), max(1, num_layers // 2 + 1))
        joiners.append(Placement(f"s{i:02d}", 0, length, round(rng.uniform(0.5, 5.0), 3)))
    if sum(s.length for s in joiners) < num_layers + 1:  # cannot cover the model, or not after a departure
        return None
    return num_layers, joiners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ratios = {"after joining": [], "after rebalancing": [], "after a departure + rebalancing": []}
    done = 0
    while done < args.instances:
        made = instance(rng)
        if made is None:
            continue
        num_layers, joiners = made
        placed: list[Placement] = []
        for j in joiners:  # each joiner sees the servers before it
            span = choose_span(placed, num_layers, j.length)
            placed.append(Placement(j.server_id, span.start, j.length, j.throughput))
        best = optimum(placed, num_layers)
        if best <= 0:
            continue
        ratios["after joining"].append(swarm_throughput(placed, num_layers) / best)
        placed = rebalance(placed, num_layers, rng)
        ratios["after rebalancing"].append(swarm_throughput(placed, num_layers) / best)
        placed.pop(rng.randrange(len(placed)))
        best = optimum(placed, num_layers)
        if best > 0:
            placed = rebalance(placed, num_layers, rng)
            ratios["after a departure + rebalancing"].append(swarm_throughput(placed, num_layers) / best)
        done += 1
    print(f"{args.instances} random swarms (6-10 layers, 3-6 servers, throughputs 0.5-5, spans of 1/4-1/2 of the layers)")
    print(f"{'phase':34} {'median':>7} {'mean':>7} {'worst':>7} {'p10':>7}")
    for phase, values in ratios.items():
        values.sort()
        p10 = values[len(values) // 10]
        print(f"{phase:34} {statistics.median(values):7.3f} {statistics.fmean(values):7.3f} {values[0]:7.3f} {p10:7.3f}")


if __name__ == "__main__":
    main()
