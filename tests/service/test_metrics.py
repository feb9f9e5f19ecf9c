"""/metrics on the gateway and on blockservers: Prometheus' text format, parsed by
prometheus_client, counting what concurrent clients, a bad request, a failover and a scoring pass
really did."""

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.service.inprocess import Fault, in_process_swarm

SPANS = {"a": "0:3", "b": "3:6", "b2": "3:6"}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_what_happened(tiny_dir):
    body = {"model": "tiny", "prompt": [1, 5, 6, 7], "max_tokens": 6, "temperature": 0, "logit_bias": {"2": -100}}

    async def scenario():
        # b fails at its 3rd step frame; b2 (same layers) takes over
        async with in_process_swarm(tiny_dir("llama"), SPANS, faults=[Fault("b", 2, "drop")]) as swarm:
            for server_id in SPANS:  # routing prefers b (1 ms) to b2 (1 s)
                swarm.state.swarm.rtts.seconds[server_id] = 1.0 if server_id == "b2" else 0.001
            ok = await asyncio.gather(*(swarm.client.post("/v1/completions", json=body) for _ in range(3)))
            bad = await swarm.client.post("/v1/completions", json=body | {"temperature": 9})
            await swarm.client.post("/v1/completions", json=body | {"echo": True, "logprobs": 0, "max_tokens": 0})
            streamed = await swarm.client.post("/v1/completions", json=body | {"stream": True})
            gateway = (await swarm.client.get("/metrics"))
            servers = {}
            for server_id, app in swarm.blockservers.items():
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
                    servers[server_id] = (await c.get("/metrics")).text
            return ok, bad, streamed, gateway, servers
    ok, bad, streamed, gateway, servers = asyncio.run(scenario())
    assert [r.status_code for r in ok] == [200] * 3 and bad.status_code == 400 and streamed.status_code == 200
    assert gateway.headers["content-type"].startswith("text/plain")
    g = samples(gateway.text)
    route = "/v1/completions"
    assert g[("corolla_gateway_requests_total", (("method", "POST"), ("route", route), ("status", "200")))] == 5
    assert g[("corolla_gateway_requests_total", (("method", "POST"), ("route", route), ("status", "400")))] == 1
    assert g[("corolla_gateway_generation_tokens_total", ())] == 4 * 6
    assert g[("corolla_gateway_prompt_tokens_total", ())] == 5 * 4
    assert g[("corolla_gateway_time_to_first_token_seconds_count", ())] == 5  # every request with text (echo too)
    assert g[("corolla_gateway_inter_token_latency_seconds_count", ())] == 4 * 5
    assert g[("corolla_gateway_queue_length", ())] == 0
    assert g[("corolla_gateway_failover_events_total", (("kind", "failures"),))] >= 1
    assert g[("corolla_gateway_failover_events_total", (("kind", "recoveries"),))] >= 1
    assert g[("corolla_gateway_banned_servers", ())] == 1  # b
    a = samples(servers["a"])
    decode = a[("corolla_blockserver_step_seconds_count", (("kind", "decode"),))]
    assert decode >= 5 * 4 - 4 and a[("corolla_blockserver_step_seconds_count", (("kind", "forward"),))] == 1
    assert a[("corolla_blockserver_cache_tokens_used", ())] == 0 and a[("corolla_blockserver_sessions", ())] == 0
    assert a[("corolla_blockserver_layers", ())] == 3 and a[("corolla_blockserver_cache_tokens", ())] > 0
