"""--verify-rate: a blockserver that returns perturbed hidden states is caught by repeating steps
on other servers of its layers, banned and routed around, and the answer is still the model's
(greedy, float32, identical to a swarm with no liar); concurrent clients get it too. A liar picked
as the verifier is caught by a third server, and the honest server keeps serving."""

import asyncio

from tests.service.inprocess import Fault, in_process_swarm
from tests.service.test_failover import complete, far

SPANS = {"liar": "0:3", "honest1": "0:3", "honest2": "0:3", "b": "3:6"}


def _reference(tiny_dir) -> str:
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}) as swarm:
            return (await complete(swarm)).json()["choices"][0]["text"]
    return asyncio.run(scenario())


def test_a_lying_server_is_caught_banned_and_routed_around(tiny_dir):
    expected = _reference(tiny_dir)

    async def scenario():
        faults = [Fault("liar", at_step=2, kind="lie")]
        async with in_process_swarm(tiny_dir("llama"), SPANS, faults=faults, gateway={"verify_rate": 1.0}) as swarm:
            far(swarm, "honest1", "honest2")  # the chain starts on the liar
            answers = await asyncio.gather(*(complete(swarm) for _ in range(3)))
            snapshot = (await swarm.client.get("/v1/swarm")).json()
            return answers, swarm.state.swarm, snapshot
    answers, swarm, snapshot = asyncio.run(scenario())
    for r in answers:
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert "liar" in swarm.bans.active() and not {"honest1", "honest2", "b"} & swarm.bans.active()
    verification = snapshot["verification"]
    assert verification["checks"] > 0 and verification["disagreements"] >= 1 and verification["caught"] >= 1
    assert swarm.failovers.recoveries >= 1 and swarm.load == {}


def test_a_lying_verifier_is_outvoted(tiny_dir):
    expected = _reference(tiny_dir)

    async def scenario():
        # the liar lies from its first answer on: as a verifier of honest1's steps it is outvoted by honest2
        faults = [Fault("liar", at_step=0, kind="lie", frames=object)]
        spans = {"honest1": "0:3", "liar": "0:3", "honest2": "0:3", "b": "3:6"}
        async with in_process_swarm(tiny_dir("llama"), spans, faults=faults, gateway={"verify_rate": 1.0}) as swarm:
            far(swarm, "liar", "honest2")  # the chain runs on honest1
            swarm.state.swarm.verifier.rng.seed(0)
            r = await complete(swarm)
            return r, swarm.state.swarm
    r, swarm = asyncio.run(scenario())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert "honest1" not in swarm.bans.active() and "honest2" not in swarm.bans.active()
    assert "liar" in swarm.bans.active()  # it verified at least once among 16 steps × 2 peers
