"""--verify-rate: a blockserver that returns perturbed hidden states is caught by repeating steps
on other servers of its layers, banned and routed around, and the answer is still the model's
(greedy, float32, identical to a swarm with no liar); concurrent clients get it too. A liar picked
as the verifier is caught by a third server, and the honest server keeps serving."""

import asyncio

import pytest

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


@pytest.mark.parametrize("family", ["bloom", "falcon-rw", "falcon-7b", "gemma2"])
def test_honest_replicas_agree_in_other_families(tiny_dir, family):
    """ALiBi (BLOOM, Falcon-RW), multi-query Falcon and Gemma 2's soft-capping and sliding window:
    a whole-sequence pass repeats cached decode steps within the tolerance, for a ragged batch
    (padding masks) and three concurrent clients, so verification never bans an honest server."""
    body = {"model": "tiny", "prompt": [[1, 40, 41, 42, 43, 44], [1, 50, 51]], "max_tokens": 12, "temperature": 0,
            "logit_bias": {"2": -100}}

    async def run(spans, verify):
        async with in_process_swarm(tiny_dir(family), spans, gateway={"verify_rate": verify}) as swarm:
            answers = await asyncio.gather(*(swarm.client.post("/v1/completions", json=body) for _ in range(3)))
            return [r.json() for r in answers], swarm.state.swarm

    plain, _ = asyncio.run(run({"a": "0:3", "b": "3:6"}, 0.0))
    checked, swarm = asyncio.run(run({"a1": "0:3", "a2": "0:3", "b1": "3:6", "b2": "3:6"}, 1.0))
    texts = lambda answers: [[c["text"] for c in a["choices"]] for a in answers]  # noqa: E731
    assert texts(checked) == texts(plain)
    stats = swarm.verifier.stats
    assert stats.checks > 0 and stats.disagreements == 0 and not swarm.bans.active()
