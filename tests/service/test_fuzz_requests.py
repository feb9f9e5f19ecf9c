"""Requests that are valid, or nearly so, drawn by hypothesis over every option the OpenAI routes
take (prompts of every shape, n, best_of, sampling, stops, logit_bias, logprobs, echo, streaming,
JSON mode, chat roles) against a gateway with a real in-process swarm: each gets 200 or 400, never
a 5xx; answers have the shape asked for; streams end with [DONE] and no error; afterwards nothing
is held and the swarm answers as before. (Schemathesis covers the schema's edges; this covers
the generation paths behind them.)"""

import asyncio
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import tiny
from tests.service.inprocess import in_process_swarm

AUTH = {"Authorization": "Bearer k"}
# the same examples on every run (CI must not fail by chance); COROLLA_FUZZ_RANDOM=1 explores anew
DERANDOMIZE = os.environ.get("COROLLA_FUZZ_RANDOM") != "1"
EXAMPLES = 40

token = st.integers(0, tiny.VOCAB - 1)
text = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=12)
prompt = st.one_of(text.filter(bool), st.lists(text, min_size=1, max_size=3), st.lists(token, min_size=1, max_size=12),
                   st.lists(st.lists(token, min_size=1, max_size=6), min_size=1, max_size=3))
sampling = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.just(0), st.just(1e-45), st.floats(0, 2)),
    "top_p": st.floats(0, 1), "top_k": st.integers(-1, 50), "seed": st.integers(0, 2**31),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "stop": st.one_of(text, st.lists(text, min_size=1, max_size=4)),
    "logit_bias": st.dictionaries(token.map(str), st.floats(-100, 100), max_size=5),
    "n": st.integers(1, 3), "stream": st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
})


def completion_body():
    extra = st.fixed_dictionaries({"prompt": prompt, "max_tokens": st.integers(0, 8)}, optional={
        "logprobs": st.integers(0, 5), "echo": st.booleans(), "best_of": st.integers(1, 4)})
    return st.tuples(sampling, extra).map(lambda parts: {"model": "tiny", **parts[0], **parts[1]})


def chat_body():
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                     "content": text})
    extra = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3),
                                   "max_tokens": st.integers(0, 8)}, optional={
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)})
    return st.tuples(sampling, extra).map(lambda parts: {"model": "tiny", **parts[0], **parts[1]})


def _check(route: str, body: dict, response) -> None:
    assert response.status_code in (200, 400), (route, body, response.status_code, response.text)
    if response.status_code == 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        return
    if body.get("stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text
        assert not any('"error"' in e for e in events[:-1]), (route, body, response.text)
        return
    answer = response.json()
    prompts = body.get("prompt")
    count = len(prompts) if isinstance(prompts, list) and not isinstance(prompts[0], int) else 1
    assert len(answer["choices"]) == count * body.get("n", 1), (body, answer)


def test_generated_requests_get_200_or_400_and_leave_nothing_behind(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, gateway={"api_key": "k"}) as swarm:
            loop = asyncio.get_running_loop()
            reference = {"model": "tiny", "prompt": [1, 40, 41], "max_tokens": 8, "temperature": 0}
            before = (await swarm.client.post("/v1/completions", headers=AUTH, json=reference)).json()

            def send(route: str, body: dict):
                coroutine = swarm.client.post(route, headers=AUTH, json=body)
                return asyncio.run_coroutine_threadsafe(coroutine, loop).result(120)

            @given(body=completion_body())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=DERANDOMIZE)
            def completions(body):
                _check("/v1/completions", body, send("/v1/completions", body))

            @given(body=chat_body())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=DERANDOMIZE)
            def chats(body):
                _check("/v1/chat/completions", body, send("/v1/chat/completions", body))

            await asyncio.to_thread(completions)
            await asyncio.to_thread(chats)
            after = (await swarm.client.post("/v1/completions", headers=AUTH, json=reference)).json()
            budgets = {s: swarm.service(s).runtime.cache_tokens_left for s in swarm.blockservers}
            full = {s: swarm.service(s).settings.cache_tokens for s in swarm.blockservers}
            return before, after, swarm.state.swarm, budgets, full
    before, after, swarm, budgets, full = asyncio.run(scenario())
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    assert swarm.load == {} and not swarm.bans.active() and budgets == full
