"""Cross-session batching on a blockserver: sessions at different positions joining and leaving
at any step get, from batched ticks, the outputs they get alone (float32, within 1e-4), in every
family; a long prompt is run in chunks between the others' decode ticks."""

import asyncio
import random

import pytest
import torch

from blockserver.runtime import Runtime
from shared.compute import ComputeThread
from shared.models.loader import load_span
from tests import tiny


@pytest.mark.parametrize("family", list(tiny.configs()))
def test_eight_sessions_joining_and_leaving_equal_their_solo_runs(tiny_dir, family):
    span = load_span(tiny_dir(family), 1, 5, dtype="float32")
    compute = ComputeThread("test", 1)
    rng = random.Random(hash(family) % 1000)
    plans = [dict(rows=rng.choice([1, 1, 2]), prompt=rng.randint(1, 20), steps=rng.randint(5, 25),
                  join=rng.randint(0, 10)) for _ in range(8)]  # join after that many other ticks
    records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in plans]

    async def session(runtime, i, plan):
        for _ in range(plan["join"]):
            await asyncio.sleep(0.002)
        rows, gen = plan["rows"], torch.Generator().manual_seed(i)
        s = await runtime.open(f"s{i}", rows, 64, 1, 5, reserve_length=plan["prompt"])
        position = 0
        for tokens in [plan["prompt"]] + [1] * plan["steps"]:
            x = torch.randn(rows, tokens, span.hidden_size, generator=gen)
            records[i].append((x, await runtime.step(s, position, x, None, None)))
            position += tokens
        await runtime.close(s.session_id)  # leaves while others go on

    async def scenario():
        runtime = Runtime(span, 10_000, compute, prefill_chunk_tokens=8, page_tokens=8)
        await asyncio.gather(*(session(runtime, i, p) for i, p in enumerate(plans)))
        assert runtime.cache_tokens_left == 10_000
        return runtime.scheduler

    scheduler = asyncio.run(scenario())
    assert scheduler.items > scheduler.ticks  # steps really shared ticks
    for i, plan in enumerate(plans):
        cache = span.new_cache(plan["rows"], 64)
        for x, got in records[i]:
            torch.testing.assert_close(got, span.step(x, cache, None, 1, 5), atol=1e-4, rtol=0)
    compute.shutdown()


def test_a_long_prompt_waits_its_turn_chunk_by_chunk(tiny_dir):
    """While a 200-token prompt runs in chunks of 8, a decoding session keeps getting its next token
    between chunks instead of waiting for the whole prompt."""
    span = load_span(tiny_dir("llama"), 0, 6, dtype="float32")
    compute = ComputeThread("test", 1)

    async def scenario():
        runtime = Runtime(span, 10_000, compute, prefill_chunk_tokens=8)
        short = await runtime.open("short", 1, 256, 0, 6, reserve_length=64)
        await runtime.step(short, 0, torch.randn(1, 4, span.hidden_size), None, None)
        long = await runtime.open("long", 1, 256, 0, 6, reserve_length=200)
        prompt = asyncio.create_task(runtime.step(long, 0, torch.randn(1, 200, span.hidden_size), None, None))
        decoded = 0
        while not prompt.done():
            await runtime.step(short, 4 + decoded, torch.randn(1, 1, span.hidden_size), None, None)
            decoded += 1
        return decoded

    decoded = asyncio.run(scenario())
    assert decoded >= 10  # 25 chunks; a decode step got in between most of them
    compute.shutdown()
