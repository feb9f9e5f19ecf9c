"""The blockserver's runtime without sockets: chunked prefill, the cache budget, sub-spans."""

import asyncio

import pytest
import torch

from blockserver.runtime import Runtime
from shared.compute import ComputeThread
from shared.errors import CacheFull
from shared.models.loader import load_span


def run(coro):
    return asyncio.run(coro)


def test_chunked_prefill_equals_one_step(tiny_dir):
    span = load_span(tiny_dir("mistral"), 0, 6, dtype="float32")  # sliding windows across chunk edges
    compute = ComputeThread("test")
    hidden = torch.randn(2, 37, span.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :5] = 0

    async def prefill(chunk):
        runtime = Runtime(span, 10_000, compute, prefill_chunk_tokens=chunk)
        session = await runtime.open("s", 2, 64, 0, 6)
        out = await runtime.step(session, 0, hidden, mask, None)
        after = await runtime.step(session, 37, hidden[:, :1], None, None)
        return out, after

    whole, whole_next = run(prefill(512))
    chunked, chunked_next = run(prefill(8))
    real = mask.bool()
    torch.testing.assert_close(chunked[real], whole[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_next, whole_next, atol=1e-5, rtol=0)
    compute.shutdown()


def test_cache_budget_is_reserved_and_released(tiny_dir):
    span = load_span(tiny_dir("llama"), 0, 2, dtype="float32")
    compute = ComputeThread("test")

    async def scenario():
        runtime = Runtime(span, 1000, compute, page_tokens=100, alloc_timeout_s=0.1)
        await runtime.open("a", 2, 300, 0, 2)  # no reserve_length: the whole max_length
        assert runtime.cache_tokens_left == 400
        with pytest.raises(CacheFull):
            await runtime.open("b", 1, 500, 0, 2)  # waits 0.1 s for room, then refuses
        runtime.alloc_timeout_s = 5.0
        waiter = asyncio.create_task(runtime.open("c", 1, 500, 0, 2))
        await asyncio.sleep(0.05)
        await runtime.close("a")  # frees room: the waiting open goes through
        await waiter
        assert runtime.cache_tokens_left == 500
        runtime.alloc_timeout_s = 0.1
        with pytest.raises(CacheFull, match="whole budget"):
            await runtime.open("d", 1, 2000, 0, 2)

    run(scenario())
    compute.shutdown()


def test_concurrent_opens_of_one_id_and_cancelled_closes_leak_nothing(tiny_dir):
    span = load_span(tiny_dir("llama"), 0, 2, dtype="float32")
    compute = ComputeThread("test")

    async def scenario():
        runtime = Runtime(span, 16384, compute)
        opens = await asyncio.gather(*(runtime.open("same", 1, 2048, 0, 2) for _ in range(8)),
                                     return_exceptions=True)
        assert sum(not isinstance(o, BaseException) for o in opens) == 1  # one ready, seven refused
        assert runtime.cache_tokens_left == 16384 - 2048
        closing = asyncio.create_task(runtime.close("same"))
        await asyncio.sleep(0)  # let it start, then cancel it in the middle, as a vanished client does
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        assert runtime.cache_tokens_left == 16384 and runtime.open_sessions() == []
        # an open cancelled while it waits for room takes nothing either
        await runtime.open("big", 1, 16000, 0, 2)
        waiting = asyncio.create_task(runtime.open("late", 1, 1000, 0, 2))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await runtime.close("big")
        assert runtime.cache_tokens_left == 16384 and "late" not in runtime.sessions

    run(scenario())
    compute.shutdown()


def test_sessions_reserve_pages_as_they_grow(tiny_dir):
    """A session holds room for what it has used (whole pages, growing by a quarter at least), the
    results equal a cache sized for the whole length up front, and a step that finds no room is
    refused without changing the session."""
    span = load_span(tiny_dir("llama"), 0, 2, dtype="float32")
    compute = ComputeThread("test")
    torch.manual_seed(0)
    prompt, steps = torch.randn(2, 10, span.hidden_size), [torch.randn(2, 1, span.hidden_size) for _ in range(40)]

    async def scenario():
        runtime = Runtime(span, 200, compute, page_tokens=16, alloc_timeout_s=0.05)
        session = await runtime.open("s", 2, 256, 0, 2, reserve_length=10)
        assert session.reserved == 16 and runtime.cache_tokens_left == 200 - 32
        outs = [await runtime.step(session, 0, prompt, None, None)]
        position = 10
        for x in steps[:30]:
            outs.append(await runtime.step(session, position, x, None, None))
            position += 1
        assert session.reserved == 48 and runtime.cache_tokens_left == 200 - 96  # 16 -> 32 -> 48
        hog = await runtime.open("hog", 1, 256, 0, 2, reserve_length=90)  # 96 tokens: 8 left
        with pytest.raises(CacheFull):
            await runtime.step(session, position, torch.randn(2, 20, span.hidden_size), None, None)
        assert session.cache.length == position and session.reserved == 48  # unchanged
        await runtime.close(hog.session_id)
        for x in steps[30:]:
            outs.append(await runtime.step(session, position, x, None, None))
            position += 1
        await runtime.close("s")
        assert runtime.cache_tokens_left == 200
        return outs

    outs = run(scenario())
    cache = span.new_cache(2, 256)  # the whole length up front
    expected = [span.step(prompt, cache)] + [span.step(x, cache) for x in steps]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    compute.shutdown()


def test_a_session_may_run_part_of_the_span(tiny_dir):
    directory = tiny_dir("llama")
    whole = load_span(directory, 0, 4, dtype="float32")
    part = load_span(directory, 2, 4, dtype="float32")
    hidden = torch.randn(1, 5, whole.hidden_size)
    middle = whole.step(hidden, whole.new_cache(1, 8), end=2)
    torch.testing.assert_close(whole.step(middle, whole.new_cache(1, 8), start=2), part.step(middle, part.new_cache(1, 8)),
                               atol=1e-6, rtol=0)


def test_a_running_session_growing_goes_before_new_work():
    """A new open waiting for room must not starve a running session's next page (which would be
    refused with cache_full and the session preempted): growth is served first, opens in order."""
    from blockserver.budget import CacheBudget

    async def scenario():
        budget = CacheBudget(48)
        await budget.take(32, 1.0)  # a running session
        order = []

        async def take(name, tokens, growth=False):
            await budget.take(tokens, 1.0, growth=growth)
            order.append(name)

        opening = asyncio.create_task(take("open", 32))  # waits: 16 free
        await asyncio.sleep(0)
        await take("growth", 16, growth=True)  # goes past the waiting open, at once
        budget.give(48)  # the running session ends
        await opening
        with pytest.raises(CacheFull):
            await budget.take(32, 0.01)
        return order, budget.left

    assert asyncio.run(scenario()) == (["growth", "open"], 16)
