"""A gateway and 3 blockservers (real processes) against transformers' `generate` on the whole model."""

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = [1, 40, 41, 42, 43, 44, 45, 46, 47]  # token ids: <s> then 8 characters
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def expected(swarm):
    """Greedy tokens and text of the whole model in transformers."""
    model = AutoModelForCausalLM.from_pretrained(swarm.directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(swarm.directory)
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    tokens = [t for t in out[0, len(PROMPT):].tolist()]
    if 2 in tokens:
        tokens = tokens[:tokens.index(2)]
    return {"tokens": tokens, "text": tokenizer.decode(tokens, skip_special_tokens=True)}


def complete(swarm, **body):
    body = {"model": swarm.model_name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0} | body
    r = httpx.post(f"{swarm.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(swarm, path="/v1/completions", **body):
    """Return the decoded data events of a streamed request (the last one is '[DONE]')."""
    body = {"model": swarm.model_name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True} | body
    events = []
    with httpx.stream("POST", f"{swarm.url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_greedy_text_equals_transformers_generate(swarm, expected):
    out = complete(swarm)
    assert out["object"] == "text_completion" and out["model"] == swarm.model_name
    choice = out["choices"][0]
    assert choice["text"] == expected["text"]
    assert choice["finish_reason"] == ("length" if len(expected["tokens"]) == MAX_TOKENS else "stop")
    assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": len(expected["tokens"]),
                            "total_tokens": len(PROMPT) + len(expected["tokens"])}


def test_streamed_text_equals_non_streamed(swarm, expected):
    events = stream(swarm, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(expected["tokens"])
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == expected["text"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1
    assert len({c["id"] for c in chunks}) == 1


def test_n_choices_and_seed(swarm):
    a = complete(swarm, n=2, temperature=1.0, seed=1234)
    b = complete(swarm, n=2, temperature=1.0, seed=1234)
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["usage"]["prompt_tokens"] == len(PROMPT)


def test_stop_string_spanning_tokens_is_never_sent(swarm, expected):
    text = expected["text"]
    assert len(text) >= 8, text
    stop = text[4:7]  # three characters = three tokens
    cut = text.index(stop)
    out = complete(swarm, stop=[stop, "never-seen"])
    assert out["choices"][0]["text"] == text[:cut]
    assert out["choices"][0]["finish_reason"] == "stop"
    events = stream(swarm, stop=stop)
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == text[:cut]


def test_logit_bias_bans_a_token(swarm, expected):
    banned = expected["tokens"][0]
    out = complete(swarm, logit_bias={str(banned): -100})
    tokenizer = AutoTokenizer.from_pretrained(swarm.directory)
    assert tokenizer.decode([banned]) not in out["choices"][0]["text"]
    assert out["choices"][0]["text"] != expected["text"]


def test_string_prompts_in_a_batch(swarm):
    out = complete(swarm, prompt=["abc", "hello there"], max_tokens=5)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    alone = complete(swarm, prompt="hello there", max_tokens=5)
    # a left-padded batch row generates what the prompt generates alone
    assert out["choices"][1]["text"] == alone["choices"][0]["text"]


def test_chat_completions_and_alias(swarm):
    body = {"model": swarm.model_name, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 6, "temperature": 0}
    a = httpx.post(f"{swarm.url}/v1/chat/completions", json=body, timeout=60).json()
    b = httpx.post(f"{swarm.url}/v1/chat", json=body, timeout=60).json()
    assert a["object"] == "chat.completion" and a["choices"][0]["message"]["role"] == "assistant"
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    events = stream(swarm, "/v1/chat/completions", messages=body["messages"], max_tokens=6, prompt=None)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert text == a["choices"][0]["message"]["content"]


def test_models_and_health(swarm):
    models = httpx.get(f"{swarm.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == swarm.model_name
    assert httpx.get(f"{swarm.url}/v1/models/{swarm.model_name}").json()["object"] == "model"
    health = httpx.get(f"{swarm.url}/health").json()
    assert health["coverage"] == [1] * 6 and health["missing_layers"] == []
