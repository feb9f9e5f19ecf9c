"""Structured output and tools on the real SmolLM2 (in-process gateway, 3 blockservers), through
the `openai` SDK: JSON-schema answers validated by jsonschema, streamed and whole; json_object;
forced tool calls (required, named) in OpenAI's shapes; several such clients at once, each
answered as it would be alone."""

import asyncio
import json

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI

from shared.models.resolve import resolve_model
from tests.service.inprocess import in_process_swarm

SPANS = {"a": "0:10", "b": "10:20", "c": "20:30"}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "country": {"type": "string", "maxLength": 30},
                                         "population_millions": {"type": "integer", "minimum": 0, "maximum": 2000}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK_CAPITAL = [{"role": "user", "content": "Give the capital of France as JSON."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2")


def sdk(swarm) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=swarm.gateway), base_url="http://gateway", timeout=120)
    return AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http, max_retries=0)


def test_json_schema_answers_always_validate(smollm2):
    schema_format = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY, "strict": True}}

    async def scenario():
        async with in_process_swarm(smollm2, SPANS) as swarm:
            client = sdk(swarm)
            whole = await client.chat.completions.create(model="tiny", messages=ASK_CAPITAL, temperature=0,
                                                         response_format=schema_format)
            stream = await client.chat.completions.create(model="tiny", messages=ASK_CAPITAL, temperature=0,
                                                          response_format=schema_format, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            sampled = await client.chat.completions.create(model="tiny", messages=ASK_CAPITAL, temperature=1.0,
                                                           seed=3, n=3, response_format=schema_format)
            anything = await client.chat.completions.create(model="tiny", temperature=0, max_tokens=80,
                                                            messages=[{"role": "user", "content": "Describe a cat as JSON."}],
                                                            response_format={"type": "json_object"})
            completion = await client.completions.create(model="tiny", prompt="Paris facts in JSON:", max_tokens=60,
                                                         temperature=0, extra_body={"response_format": schema_format})
            return whole, streamed, sampled, anything, completion
    whole, streamed, sampled, anything, completion = asyncio.run(scenario())
    answer = json.loads(whole.choices[0].message.content)
    jsonschema.validate(answer, CITY)
    assert answer["city"] == "Paris" and whole.choices[0].finish_reason == "stop"
    assert streamed == whole.choices[0].message.content
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), CITY)
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    jsonschema.validate(json.loads(completion.choices[0].text), CITY)


def test_forced_tool_calls_and_concurrent_clients(smollm2):
    named = {"type": "function", "function": {"name": "get_weather"}}

    async def scenario():
        async with in_process_swarm(smollm2, SPANS) as swarm:
            client = sdk(swarm)

            def ask(**extra):
                return client.chat.completions.create(model="tiny", temperature=0, max_tokens=60, **extra)
            calls = [dict(messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required"),
                     dict(messages=ASK_WEATHER, tools=[WEATHER], tool_choice=named),
                     dict(messages=ASK_CAPITAL, response_format={"type": "json_object"}),
                     dict(messages=ASK_CAPITAL)]
            alone = [await ask(**c) for c in calls]
            together = await asyncio.gather(*(ask(**c) for c in calls))
            stream = await ask(stream=True, **calls[0])
            chunks = [c async for c in stream]
            followup = await ask(messages=ASK_WEATHER + [
                {"role": "assistant", "content": None, "tool_calls": [alone[0].choices[0].message.tool_calls[0]]},
                {"role": "tool", "tool_call_id": alone[0].choices[0].message.tool_calls[0].id,
                 "content": "18 degrees celsius and sunny"}], tools=[WEATHER])
            runtimes = [swarm.service(s).runtime for s in SPANS]
            assert all(r.cache_tokens_left == r.cache_tokens for r in runtimes)  # nothing held afterwards
            return alone, together, chunks, followup
    alone, together, chunks, followup = asyncio.run(scenario())
    required, forced = alone[0].choices[0], alone[1].choices[0]
    for choice, reason in ((required, "tool_calls"), (forced, "stop")):  # OpenAI ends a named choice with "stop"
        call = choice.message.tool_calls[0]
        assert choice.message.content is None and choice.finish_reason == reason
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert json.loads(forced.message.tool_calls[0].function.arguments)["city"] == "Paris"
    for a, b in zip(alone, together):
        assert a.choices[0].message.content == b.choices[0].message.content
        assert [c.function.model_dump() for c in a.choices[0].message.tool_calls or []] == \
               [c.function.model_dump() for c in b.choices[0].message.tool_calls or []]
    deltas = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in required.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert followup.choices[0].message.content  # the tool's result went back through the template


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
])
def test_bad_tool_and_format_requests_are_400s(smollm2, extra, param):
    async def scenario():
        async with in_process_swarm(smollm2, {"a": "0:30"}) as swarm:
            return await swarm.client.post("/v1/chat/completions",
                                           json={"model": "tiny", "messages": ASK_WEATHER} | extra)
    r = asyncio.run(scenario())
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
