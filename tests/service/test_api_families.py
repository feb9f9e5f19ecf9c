"""Every supported family through the gateway's API (in-process gateway and 3 blockservers) against
transformers' `generate` on the whole model, float32: greedy text identical, streamed equal to
non-streamed, rows of different lengths in one request equal to each row alone, and chat.

`generate` is always given an explicit all-ones attention mask: without one it treats the pad id
inside a prompt as padding, which an API prompt of token ids never is."""

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import tiny
from tests.service.inprocess import in_process_swarm

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 60, 61], [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
MAX_TOKENS = 12
SPANS = {"a": "0:2", "b": "2:4", "c": "4:6"}


def reference(model, ids: list[int]) -> list[int]:
    """Greedy tokens of the whole model, up to its EOS (2) or MAX_TOKENS."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                         eos_token_id=2, pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(2)] if 2 in out else out


def sse_text(body: str) -> tuple[dict[int, str], list[str]]:
    texts: dict[int, str] = {}
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    for data in events[:-1]:
        for choice in json.loads(data)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (
                choice.get("text") or choice.get("delta", {}).get("content") or "")
    return texts, events


@pytest.mark.parametrize("family", list(tiny.configs()))
def test_api_equals_transformers_generate(family, tiny_dir):
    directory = tiny_dir(family)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)  # as saved, like the gateway loads it
    expected = [tokenizer.decode(reference(model, p), skip_special_tokens=True) for p in PROMPTS]
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    expected_chat = tokenizer.decode(reference(model, chat_ids), skip_special_tokens=True)

    async def scenario():
        async with in_process_swarm(directory, SPANS) as swarm:
            body = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0}
            singles = []
            for prompt in PROMPTS:
                r = await swarm.client.post("/v1/completions", json=body | {"prompt": prompt})
                assert r.status_code == 200, r.text
                singles.append(r.json()["choices"][0]["text"])
            batch = await swarm.client.post("/v1/completions", json=body | {"prompt": PROMPTS})
            streamed = await swarm.client.post("/v1/completions", json=body | {"prompt": PROMPTS[0], "stream": True})
            chat = await swarm.client.post("/v1/chat/completions", json=body | {
                "messages": [{"role": "user", "content": "hi there"}]})
            chat_stream = await swarm.client.post("/v1/chat/completions", json=body | {
                "messages": [{"role": "user", "content": "hi there"}], "stream": True})
            return singles, batch.json(), streamed.text, chat.json(), chat_stream.text

    singles, batch, streamed, chat, chat_stream = asyncio.run(scenario())
    assert singles == expected
    assert [c["text"] for c in sorted(batch["choices"], key=lambda c: c["index"])] == expected
    texts, events = sse_text(streamed)
    assert texts[0] == expected[0] and events[-1] == "[DONE]"
    assert chat["choices"][0]["message"]["content"] == expected_chat
    assert sse_text(chat_stream)[0][0] == expected_chat
