"""Schemathesis over the gateway's OpenAPI schema (bounded: 30 generated requests per operation),
against a gateway with a real in-process swarm behind it: no request, however malformed, gets a
5xx, every error is in OpenAI's envelope, and the swarm still answers correctly afterwards."""

import asyncio
import os

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.service.inprocess import in_process_swarm

# the same examples on every run (CI must not fail by chance); COROLLA_FUZZ_RANDOM=1 explores anew
DERANDOMIZE = os.environ.get("COROLLA_FUZZ_RANDOM") != "1"
EXAMPLES = 30


def test_no_request_gets_a_server_error(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, gateway={"api_key": "k"}) as swarm:
            loop = asyncio.get_running_loop()
            before = (await swarm.client.post("/v1/completions", headers={"Authorization": "Bearer k"}, json={
                "model": "tiny", "prompt": [1, 40, 41], "max_tokens": 8, "temperature": 0})).json()
            schema = schemathesis.openapi.from_dict(pinned(swarm.gateway.openapi()))
            statuses = await asyncio.to_thread(_fuzz, schema, swarm.client, loop)
            after = (await swarm.client.post("/v1/completions", headers={"Authorization": "Bearer k"}, json={
                "model": "tiny", "prompt": [1, 40, 41], "max_tokens": 8, "temperature": 0})).json()
            return statuses, before, after, swarm.state.swarm
    statuses, before, after, swarm = asyncio.run(scenario())
    assert len(statuses) > 100 and 200 in statuses
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    assert swarm.load == {} and not swarm.bans.active()


def pinned(spec: dict) -> dict:
    """The schema with `model` fixed to the served id, so that generated bodies get past the model
    check and exercise everything after it (sampling, stops, logprobs, tools, generation)."""
    for name, component in spec["components"]["schemas"].items():
        if "model" in component.get("properties", {}) and name.endswith("Request"):
            component["properties"]["model"] = {"type": "string", "enum": ["tiny"]}
    return spec


def _fuzz(schema, client: httpx.AsyncClient, loop) -> list[int]:
    statuses = []
    operations = [r.ok() for r in schema.get_all_operations()]
    for operation, mode in [(o, m) for o in operations for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]:

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=DERANDOMIZE)
        def no_server_error(case):
            kwargs = case.as_transport_kwargs(base_url="http://gateway", headers={"Authorization": "Bearer k"})
            kwargs.pop("cookies", None)
            if isinstance(kwargs.get("data"), bytes | str):  # requests' raw body is httpx's content
                kwargs["content"] = kwargs.pop("data")
            response = asyncio.run_coroutine_threadsafe(client.request(**kwargs), loop).result(120)
            statuses.append(response.status_code)
            assert response.status_code < 500 or (case.path == "/health" and response.status_code == 503), (
                case.method, case.path, case.body, case.query, response.status_code, response.text)
            if response.status_code >= 400 and "json" in str(response.headers.get("content-type")):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

        try:
            no_server_error()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
            assert mode == GenerationMode.NEGATIVE
    return statuses
