"""Log-probabilities, prompt scoring (echo) and best_of through an in-process swarm, against the
whole model in transformers (float32), in OpenAI's shapes as the `openai` package types them."""

import asyncio
import json
import math

import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoModelForCausalLM

from tests.service.inprocess import in_process_swarm

SPANS = {"a": "0:2", "b": "2:4", "c": "4:6"}
PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 60, 61], [5, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
NO_EOS = {"2": -100}  # random tiny models stop early otherwise; the bias does not change reported logprobs
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab]: the distribution after each prefix of ids."""
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logprobs


def events(body: str) -> list[dict]:
    lines = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def openai_typed(completion: dict) -> dict:
    """The answer without an echoed prompt's first token, whose logprob is null (as OpenAI's and
    vLLM's are: nothing comes before it) where the `openai` package's type has only floats."""
    copy = json.loads(json.dumps(completion))
    for choice in copy["choices"]:
        lp = choice["logprobs"]
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            for key in lp:
                lp[key] = lp[key][1:]
    return copy


def test_prompt_scores_and_token_logprobs_equal_transformers(tiny_dir, reference):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), SPANS) as swarm:
            c = swarm.client
            score = await c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "echo": True,
                                                          "logprobs": 2, "max_tokens": 0})
            gen = await c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "logprobs": 3,
                                                        "max_tokens": 6, "temperature": 0, "logit_bias": NO_EOS})
            both = await c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "logprobs": 3,
                                                         "echo": True, "max_tokens": 6, "temperature": 0,
                                                         "logit_bias": NO_EOS})
            streamed = await c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "logprobs": 3,
                                                             "max_tokens": 6, "temperature": 0, "stream": True,
                                                             "logit_bias": NO_EOS})
            # nothing stays on the servers after a scoring pass or a generation
            runtimes = [swarm.service(s).runtime for s in SPANS]
            assert all(r.cache_tokens_left == r.cache_tokens and not r.sessions for r in runtimes)
            return score, gen, both, streamed
    score, gen, both, streamed = asyncio.run(scenario())
    for r in (score, gen, both):
        assert r.status_code == 200, r.text
        Completion.model_validate(openai_typed(r.json()))

    for prompt, choice in zip(PROMPTS, score.json()["choices"]):  # one parallel pass, rows of different lengths
        lp = choice["logprobs"]
        assert choice["finish_reason"] == "length" and len(lp["tokens"]) == len(prompt)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = reference(prompt)
        for i in range(1, len(prompt)):
            assert abs(lp["token_logprobs"][i] - float(want[i - 1, prompt[i]])) < TOL
            top = sorted(lp["top_logprobs"][i].values(), reverse=True)
            assert all(abs(a - b) < TOL for a, b in zip(top, want[i - 1].topk(2).values.tolist()))

    choice = gen.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    # each generated token: its logprob under transformers given everything before it (teacher forced)
    ids = list(PROMPTS[0])
    for logprob, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        want = reference(ids)[-1]
        token = int((want - 100 * (torch.arange(len(want)) == 2)).argmax())  # greedy, under the bias
        assert abs(logprob - float(want[token])) < TOL and len(top) == 3
        assert abs(max(top.values()) - float(want.max())) < TOL  # alternatives: the model's own, unbiased
        ids.append(token)

    echoed = both.json()["choices"][0]
    assert echoed["text"].endswith(choice["text"]) and len(echoed["logprobs"]["tokens"]) == len(PROMPTS[0]) + 6
    assert echoed["logprobs"]["token_logprobs"][len(PROMPTS[0]):] == lp["token_logprobs"]

    chunks = [e for e in events(streamed.text) if e["choices"] and e["choices"][0]["logprobs"]]
    assert sum((e["choices"][0]["logprobs"]["token_logprobs"] for e in chunks), []) == lp["token_logprobs"]
    assert sum((e["choices"][0]["logprobs"]["text_offset"] for e in chunks), []) == lp["text_offset"]


def test_chat_logprobs_streamed_and_whole_in_openai_shapes(tiny_dir):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "logit_bias": NO_EOS}

    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), SPANS) as swarm:
            # four clients at once, each as it would be alone
            whole = await asyncio.gather(*(swarm.client.post("/v1/chat/completions", json=body) for _ in range(4)))
            streamed = await swarm.client.post("/v1/chat/completions", json=body | {"stream": True})
            plain = await swarm.client.post("/v1/chat/completions", json=body | {"logprobs": False,
                                                                                 "top_logprobs": None})
            return whole, streamed, plain
    whole, streamed, plain = asyncio.run(scenario())
    answers = [ChatCompletion.model_validate(r.json()) for r in whole]
    content = answers[0].choices[0].logprobs.content
    for other in answers[1:]:  # batched together or not, each as alone (float rounding aside)
        assert other.choices[0].message.content == answers[0].choices[0].message.content
        theirs = other.choices[0].logprobs.content
        assert [t.token for t in theirs] == [t.token for t in content]
        assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(theirs, content))
    assert len(content) == 5 and "".join(t.token for t in content) == answers[0].choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               and math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-6) for t in content)  # greedy
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    chunks = [ChatCompletionChunk.model_validate(e) for e in events(streamed.text)]
    got = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert [t.token for t in got] == [t.token for t in content]  # batched with others or not: float rounding only
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(got, content))
    assert plain.json()["choices"][0]["logprobs"] is None


def test_best_of_returns_the_most_likely_of_its_rows(tiny_dir):
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 1.0, "seed": 7,
            "logit_bias": NO_EOS}

    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), SPANS) as swarm:
            every = await swarm.client.post("/v1/completions", json=body | {"n": 4, "logprobs": 0})
            best = await swarm.client.post("/v1/completions", json=body | {"n": 1, "best_of": 4})
            best2 = await swarm.client.post("/v1/completions", json=body | {"n": 2, "best_of": 4, "logprobs": 0})
            return every.json(), best.json(), best2.json()
    every, best, best2 = asyncio.run(scenario())
    ranked = sorted(every["choices"], key=lambda c: sum(c["logprobs"]["token_logprobs"]), reverse=True)
    assert len({c["text"] for c in every["choices"]}) > 1  # the rows differ, so the choice means something
    assert [c["text"] for c in best["choices"]] == [ranked[0]["text"]] and best["choices"][0]["logprobs"] is None
    assert [c["text"] for c in best2["choices"]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in best2["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == 20  # every row generated is counted


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1], "logprobs": 21}, "logprobs"),
    ({"prompt": [1], "best_of": 1, "n": 2}, "best_of"),
    ({"prompt": [1], "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": [1], "suffix": "x"}, "suffix"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
])
def test_bad_scoring_requests_are_400s(tiny_dir, body, param):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"

    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), SPANS) as swarm:
            return await swarm.client.post(route, json={"model": "tiny"} | body)
    r = asyncio.run(scenario())
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("family", ["bloom", "falcon-rw", "gemma2"])
def test_prompt_scores_in_other_families(tiny_dir, family):
    """ALiBi, soft-capping and left padding in the stateless scoring pass: as transformers scores."""
    directory = tiny_dir(family)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    async def scenario():
        async with in_process_swarm(directory, SPANS) as swarm:
            return await swarm.client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "echo": True,
                                                                    "logprobs": 1, "max_tokens": 0})
    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    for prompt, choice in zip(PROMPTS, r.json()["choices"]):
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None
        assert max(abs(got[i] - float(want[i - 1, prompt[i]])) for i in range(1, len(prompt))) < TOL


def test_echo_without_logprobs_prepends_the_prompt(tiny_dir):
    """Found by tests/service/test_fuzz_requests.py: echo with max_tokens > 0 and no logprobs
    scored the prompt with `None` alternatives (a 500)."""
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), SPANS) as swarm:
            body = {"model": "tiny", "prompt": "ab", "max_tokens": 4, "temperature": 0, "logit_bias": NO_EOS}
            plain = await swarm.client.post("/v1/completions", json=body)
            echoed = await swarm.client.post("/v1/completions", json=body | {"echo": True})
            streamed = await swarm.client.post("/v1/completions", json=body | {"echo": True, "stream": True})
            return plain, echoed, streamed
    plain, echoed, streamed = asyncio.run(scenario())
    assert echoed.status_code == 200 and echoed.json()["choices"][0]["logprobs"] is None
    assert echoed.json()["choices"][0]["text"] == "ab" + plain.json()["choices"][0]["text"]
    assert "".join(e["choices"][0]["text"] for e in events(streamed.text) if e["choices"]) == \
        echoed.json()["choices"][0]["text"]
