"""Facts about models live with the adapters (shared/models): context length, KV bytes, EOS ids."""

import asyncio

import pytest
import torch

from shared.loops import every
from shared.models.loader import eos_ids, family_for, load_config, load_facts, load_tokenizer, random_layer


@pytest.mark.parametrize("name, kv_heads", [("llama", 2), ("falcon-7b", 1), ("falcon-new", 4), ("falcon-rw", 4),
                                            ("bloom", 4), ("qwen3", 2)])
def test_kv_bytes_per_token_counts_the_real_kv_heads(tiny_dir, name, kv_heads):
    facts = load_facts(tiny_dir(name))
    head_dim = 16  # hidden 64 / 4 heads (and qwen3's explicit head_dim)
    assert facts.kv_bytes_per_token(torch.bfloat16) == 2 * kv_heads * head_dim * 2
    # and it is what the real layers write into the cache
    span = random_layer(facts.config, "cpu", torch.float32)
    cache = span.new_cache(1, 4)
    span.step(torch.randn(1, 3, 64), cache)
    assert cache.nbytes == 4 * facts.kv_bytes_per_token(torch.float32)


def test_context_length_and_eos_of_every_family(tiny_dir):
    assert load_facts(tiny_dir("llama")).context_length == 256
    assert load_facts(tiny_dir("bloom")).context_length == 2048  # BLOOM's config names none
    directory = tiny_dir("falcon-rw")
    config = load_config(directory)
    assert eos_ids(directory, config, load_tokenizer(directory)) == {2}
    assert family_for(config).name == "falcon"


def test_a_failing_loop_body_is_logged_and_the_loop_goes_on(caplog):
    calls = []

    async def body():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a malformed reply")

    async def scenario():
        task = asyncio.create_task(every("test", 0.01, body, backoff_s=0.01))
        while len(calls) < 5:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert len(calls) >= 5 and "background loop 'test' failed" in caplog.text
