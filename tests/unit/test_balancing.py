"""Span choice, rebalancing and routing costs: pure functions over plain records."""

import random

from gateway.routing import route_chain
from shared.balancing import (
    Placement,
    choose_span,
    layer_throughputs,
    should_move,
    simulate_best_responses,
    swarm_throughput,
)
from shared.records import ServerInfo, Span


def P(sid, start, length, tp=1.0):
    return Placement(sid, start, length, tp)


def test_a_joiner_fills_the_bottleneck():
    swarm = [P("a", 0, 4, 2.0), P("b", 4, 4, 1.0)]  # layers 4..7 are the weakest
    assert choose_span(swarm, 8, 4) == Span(4, 8)
    assert choose_span([], 8, 3) == Span(0, 3)  # empty swarm: lowest start wins the tie
    # uncovered layers come first, even if only one of the window's layers is uncovered
    assert choose_span([P("a", 0, 6, 5.0)], 8, 3) == Span(5, 8)
    assert choose_span([P("a", 0, 8)], 8, 20) == Span(0, 8)  # clipped to the model


def test_sums_do_not_depend_on_the_order_servers_are_listed():
    servers = [P(f"s{i}", i % 5, 3, 0.1 * (i + 1) / 3) for i in range(12)]
    shuffled = servers[:]
    random.Random(3).shuffle(shuffled)
    assert layer_throughputs(servers, 8) == layer_throughputs(shuffled, 8)  # bit-identical floats


def test_rebalancing_moves_only_when_it_pays():
    # two servers stacked on layers 0..3, nobody on 4..7: one of them must move
    stacked = [P("a", 0, 4), P("b", 0, 4)]
    assert should_move(stacked[0], stacked, 8, rng=random.Random(0)) == Span(4, 8)
    # a tiling swarm: nothing to gain
    tiled = [P("a", 0, 4), P("b", 4, 4)]
    assert should_move(tiled[0], tiled, 8, rng=random.Random(0)) is None
    # a small gain (weakest layer 1.0 -> 1.2) is below balance_quality: stay
    almost = [P("a", 0, 4, 1.0), P("b", 4, 4, 1.0), P("c", 0, 8, 0.4), P("d", 2, 4, 0.2)]
    assert should_move(almost[3], almost, 8, rng=random.Random(0)) is None


def test_rebalancing_never_uncovers_a_layer():
    # "a" alone serves layers 0..3; layers 4..7 are weaker but moving would leave 0..3 empty
    swarm = [P("a", 0, 4, 3.0), P("b", 4, 4, 0.5)]
    assert should_move(swarm[0], swarm, 8, rng=random.Random(0)) is None


def test_best_responses_reach_the_optimum_on_a_small_swarm():
    start = [P("a", 0, 3, 1.0), P("b", 0, 3, 1.0), P("c", 0, 3, 1.0), P("d", 0, 3, 1.0)]
    settled = simulate_best_responses(start, 6, random.Random(1))
    assert swarm_throughput(settled, 6) == 2.0  # two servers on each half


def info(sid, start, end, rps=1000.0, sessions=0, cache=10**6, pings=None):
    return ServerInfo(server_id=sid, url=f"http://127.0.0.1:9/{sid}", model="m", start=start, end=end,
                      decode_tokens_per_s=rps, sessions=sessions, cache_tokens_left=cache, next_pings=pings or {})


def test_routing_prefers_the_faster_path():
    servers = [info("fast", 0, 4, rps=1000), info("slow", 0, 4, rps=10)]
    assert route_chain(servers, 4)[0].server.server_id == "fast"
    near_far = [info("near", 0, 4), info("far", 0, 4)]
    rtts = {"near": 0.001, "far": 0.101}
    assert all(route_chain(near_far, 4, rtts=rtts)[0].server.server_id == "near" for _ in range(20))
    # server-to-server RTTs published in next_pings steer the second hop
    chain = [info("a", 0, 2, pings={"b1": 0.2, "b2": 0.002}), info("b1", 2, 4), info("b2", 2, 4)]
    assert route_chain(chain, 4, rtts={"a": 0.001, "b1": 0.001, "b2": 0.001})[1].server.server_id == "b2"


def test_routing_penalizes_missing_cache():
    servers = [info("full", 0, 4, cache=100), info("roomy", 0, 4, rps=100)]  # clearly slower: 40 ms vs 4
    assert route_chain(servers, 4, cache_tokens=1000)[0].server.server_id == "roomy"
    assert route_chain(servers, 4, cache_tokens=10)[0].server.server_id == "full"


def test_routing_spreads_load_over_equal_replicas():
    servers = [info("x", 0, 4), info("y", 0, 4)]
    rtts, load = {"x": 0.001, "y": 0.0012}, {}
    picks = []
    for _ in range(8):  # the gateway counts a session from routing on
        pick = route_chain(servers, 4, rtts=rtts, load=load)[0].server.server_id
        load[pick] = load.get(pick, 0) + 1
        picks.append(pick)
    assert picks.count("x") == 4 and picks.count("y") == 4


def test_a_batching_server_costs_little_per_extra_session():
    """Routing counts what one more session adds to a batched tick, not a whole step per session:
    a busy batching server stays preferable to a slower idle one."""
    from blockserver.throughput import Throughput

    alone, batched = 100.0, 1000.0  # tokens/s per layer: one session, 16 batched
    busy = info("busy", 0, 4, rps=alone, sessions=8).model_copy(update={"batch_decode_tokens_per_s": batched})
    idle_but_slow = info("slow", 0, 4, rps=alone / 3, sessions=0)
    assert route_chain([busy, idle_but_slow], 4, rtts={"busy": 0.001, "slow": 0.001})[0].server.server_id == "busy"
    no_batching = busy.model_copy(update={"batch_decode_tokens_per_s": 0.0})
    assert route_chain([no_batching, idle_but_slow], 4,
                       rtts={"busy": 0.001, "slow": 0.001})[0].server.server_id == "slow"
    # span choice hears the batched capacity
    t = Throughput(decode_tokens_per_s=100, batch_decode_tokens_per_s=1000, prefill_tokens_per_s=500,
                   network_tokens_per_s=1e6)
    assert t.announced(9) == 1000 / 5


def test_fake_joiners_claiming_huge_speeds_cannot_lure_serving_servers_away():
    from dataclasses import replace

    from shared.balancing import placements

    def info(server_id, start, end, throughput, state="online"):
        return ServerInfo(server_id=server_id, url="http://127.0.0.1:9", model="fp", start=start, end=end,
                          throughput=throughput, state=state)

    # a alone serves 0:15; forty fake joiners "cover" it at 1e9 tokens/s each
    real = [info("a", 0, 15, 10.0), info("b", 15, 30, 10.0)]
    fakes = [info(f"fake-{i:02d}", 0, 15, 1e9, state="joining") for i in range(40)]
    swarm = placements(real + fakes)
    assert {p.throughput for p in swarm if not p.online} == {10.0}  # claims cut to the online median
    a = next(p for p in swarm if p.server_id == "a")
    # were the fakes believed to serve, a would leave 0:15 for b's layers ...
    believed = [replace(p, online=True) for p in swarm]
    assert should_move(a, believed, 30, 0.75, random.Random(0)) is not None
    # ... but a serving server never leaves layers no other online server serves
    assert should_move(a, swarm, 30, 0.75, random.Random(0)) is None
