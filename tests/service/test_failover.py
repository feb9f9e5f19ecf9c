"""Failover, bans and routing in-process, with servers that fail on purpose at a chosen step
(the chain's `connect` seam): the answer is identical to the failure-free one (float32, greedy)."""

import asyncio
import json

import pytest

from tests.service.inprocess import Fault, in_process_swarm

BODY = {"model": "tiny", "prompt": [1, 40, 41, 42, 43, 44, 45, 46], "max_tokens": 16, "temperature": 0,
        "logit_bias": {"2": -100}}  # no EOS: every run generates all 16 tokens


def far(swarm, *server_ids):
    """Make routing prefer other servers first: these measure a 1 s round trip, the others 1 ms."""
    for server_id in swarm.blockservers:
        swarm.state.swarm.rtts.seconds[server_id] = 1.0 if server_id in server_ids else 0.001


async def complete(swarm, **extra):
    r = await swarm.client.post("/v1/completions", json=BODY | extra)
    return r


@pytest.fixture(scope="module")
def expected(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}) as swarm:
            return (await complete(swarm)).json()["choices"][0]["text"]
    return asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["drop", "hang", "garbage"])
def test_a_failing_server_is_banned_and_replaced_by_a_replica(tiny_dir, expected, kind):
    async def scenario():
        faults = [Fault("a1", at_step=5, kind=kind)]
        async with in_process_swarm(tiny_dir("llama"), {"a1": "0:3", "a2": "0:3", "b": "3:6"}, faults=faults,
                                    gateway={"step_timeout_s": 1.0}) as swarm:
            far(swarm, "a2")
            r = await complete(swarm)
            return r, swarm.state.swarm
    r, swarm = asyncio.run(scenario())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert swarm.bans.active() == {"a1"}
    assert (swarm.failovers.failures, swarm.failovers.recoveries) == (1, 1)
    assert swarm.load == {}  # every hop session gave its lease back


def test_a_replacement_with_other_boundaries_and_overlapping_spans(tiny_dir, expected):
    """a (0:3) fails; the replacement is e[0:2] + c[2:3], and c already serves 3:6 of the same chain:
    each hop session has its own id, so the second session on c does not collide with the first."""
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "c": "2:6", "e": "0:2"},
                                    faults=[Fault("a", at_step=4)]) as swarm:
            far(swarm, "e")
            r = await complete(swarm, stream=True)
            return r, swarm.state.swarm
    r, swarm = asyncio.run(scenario())
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected
    assert swarm.failovers.recoveries == 1 and swarm.load == {}


def test_no_replacement_fails_cleanly_within_the_deadline(tiny_dir):
    async def scenario(stream: bool):
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, faults=[Fault("b", at_step=3)],
                                    gateway={"failover_timeout_s": 0.5}) as swarm:
            r = await complete(swarm, stream=stream)
            after = await complete(swarm)  # b is banned: refused at once, before anything starts
            return r, after, swarm.state.swarm
    whole, after, swarm = asyncio.run(scenario(stream=False))
    assert whole.status_code == 503 and whole.headers["retry-after"]
    assert whole.json()["error"]["code"] == "service_unavailable"
    assert after.status_code == 503 and swarm.failovers.given_up == 1 and swarm.load == {}
    streamed, _, swarm = asyncio.run(scenario(stream=True))
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert swarm.failovers.given_up == 1 and swarm.load == {}


def test_error_messages_carry_no_server_addresses(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"},
                                    gateway={"failover_timeout_s": 0.5}) as swarm:
            del swarm.blockservers["b"]  # its record stays; connecting fails "cannot connect to http://…"
            whole = await complete(swarm)
            streamed = await complete(swarm, stream=True)
            return whole, streamed
    whole, streamed = asyncio.run(scenario())
    assert whole.status_code == 503
    for text in (whole.text, streamed.text):
        assert "inprocess" not in text and "http" not in text, text
