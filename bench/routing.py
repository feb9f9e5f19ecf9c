"""How long the gateway takes to route a chain as its registry grows: 10 to 1,000 records of a
30-layer model (SmolLM2's depth), with random spans, speeds, loads and measured RTTs, like a large
swarm or a flood of fake records. The figure to hold: under 10 ms at 1,000 records (the gateway
routes on its event loop, once per request and per failover).

    python -m bench.routing
"""

from __future__ import annotations

import random
import statistics
import time

from gateway.routing import route_chain
from shared.records import ServerInfo

LAYERS = 30


def registry(count: int, rng: random.Random) -> tuple[list[ServerInfo], dict[str, float], dict[str, int]]:
    servers, rtts, load = [], {}, {}
    ids = [f"bs-{i:05d}" for i in range(count)]
    for i, server_id in enumerate(ids):
        length = rng.randint(2, 12)
        start = rng.randint(0, LAYERS - length)
        if i < 5:  # five of them tile the model, so that a route exists
            start, length = i * LAYERS // 5, LAYERS // 5
        pings = {peer: rng.uniform(0.001, 0.08) for peer in rng.sample(ids, min(5, count))}
        servers.append(ServerInfo(server_id=server_id, url="http://127.0.0.1:9", model="fp", start=start,
                                  end=start + length, decode_tokens_per_s=rng.uniform(50, 5000),
                                  batch_decode_tokens_per_s=rng.uniform(500, 50000), cache_tokens_left=16384,
                                  sessions=rng.randint(0, 8), next_pings=pings))
        rtts[server_id] = rng.uniform(0.001, 0.1)
        load[server_id] = rng.randint(0, 3)
    return servers, rtts, load


def main() -> None:
    rng = random.Random(0)
    print(f"{'records':>8} {'median ms':>10} {'p90 ms':>8}  (route over {LAYERS} layers, 50 routes each)")
    for count in (10, 100, 300, 1000):
        servers, rtts, load = registry(count, rng)
        times = []
        for _ in range(50):
            started = time.perf_counter()
            route_chain(servers, LAYERS, rtts=rtts, load=load, rng=rng, cache_tokens=512)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        print(f"{count:>8} {statistics.median(times):>10.2f} {times[44]:>8.2f}")


if __name__ == "__main__":
    main()
