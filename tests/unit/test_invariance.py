"""Batch invariance: a session's step results are the same bit for bit whether it runs alone or
batched with others (joining, leaving, prompting, at other positions), in float32 and bfloat16,
dense and quantized; and a tiled product equals its rows' products in any company."""

import asyncio
import random

import pytest
import torch

from blockserver.runtime import Runtime
from shared.compute import ComputeThread
from shared.models.loader import load_span
from shared.models.rows import DECODE, PREFILL, TiledLinear, make_tiled, row_plan


def run_sessions(span, plans, concurrent: bool) -> list[list[torch.Tensor]]:
    """Each plan's outputs, its sessions run together (one Runtime) or one after another."""
    compute = ComputeThread("test", 1)
    outputs: list[list[torch.Tensor]] = [[] for _ in plans]

    async def session(runtime, i, plan):
        if concurrent:
            for _ in range(plan["join"]):
                await asyncio.sleep(0.002)
        gen = torch.Generator().manual_seed(i)
        s = await runtime.open(f"s{i}", plan["rows"], 64, span.start, span.end, reserve_length=plan["prompt"])
        position = 0
        for tokens in [plan["prompt"]] + [1] * plan["steps"]:
            x = torch.randn(plan["rows"], tokens, span.hidden_size, generator=gen)
            outputs[i].append(await runtime.step(s, position, x, None, None))
            position += tokens
        await runtime.close(s.session_id)

    async def scenario():
        runtime = Runtime(span, 10_000, compute, prefill_chunk_tokens=512, page_tokens=8)
        if concurrent:
            await asyncio.gather(*(session(runtime, i, p) for i, p in enumerate(plans)))
            assert runtime.scheduler.items > runtime.scheduler.ticks  # steps really shared ticks
        else:
            for i, p in enumerate(plans):
                await session(runtime, i, p)

    asyncio.run(scenario())
    compute.shutdown()
    return outputs


PLANS = [dict(rows=r.choice([1, 1, 2]), prompt=r.randint(1, 20), steps=r.randint(5, 20), join=r.randint(0, 8))
         for r in [random.Random(7)] for _ in range(8)]


def differing_steps(span) -> list[tuple[int, int, float]]:
    together, alone = run_sessions(span, PLANS, True), run_sessions(span, PLANS, False)
    return [(i, step, (a - b).abs().max().item()) for i in range(len(PLANS))
            for step, (a, b) in enumerate(zip(together[i], alone[i])) if not torch.equal(a, b)]


@pytest.mark.parametrize("dtype,quant", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"),
                                         ("bfloat16", "int4")])
def test_batched_steps_equal_solo_steps_bit_for_bit(smollm2_shaped, dtype, quant):
    span = load_span(smollm2_shaped, 0, 2, dtype=dtype, quant=quant)
    assert differing_steps(span) == []
    if quant == "none":  # the control: without fixed tiles the same sessions do differ
        span.batch_invariant = False
        assert differing_steps(span) != []


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_every_ragged_family_keeps_its_rows_apart(tiny_dir, family):
    """Windows, fused projections, per-layer rotary: batched equals solo bit for bit (bfloat16)."""
    assert differing_steps(load_span(tiny_dir(family), 0, 6, dtype="bfloat16")) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tiled_row_is_the_same_in_any_company(dtype):
    """At shapes where GEMM blocking does change with the number of rows (576 wide), a row's
    product under a plan is identical alone, among other decode rows, and after a prompt's rows."""
    torch.manual_seed(0)
    layer = make_tiled(torch.nn.Linear(1536, 576)).to(dtype)
    assert type(layer) is TiledLinear
    x = torch.randn(1, 1536, dtype=dtype)
    others = torch.randn(63, 1536, dtype=dtype)
    with row_plan([(1, DECODE)]):
        alone = layer(x)
    with row_plan([(64, DECODE)]):
        among = layer(torch.cat([others, x]))[-1:]
    with row_plan([(20, PREFILL), (44, DECODE)]):
        after_prompt = layer(torch.cat([others, x]))[-1:]
    assert torch.equal(alone, among) and torch.equal(alone, after_prompt)
    torch.testing.assert_close(alone, torch.nn.functional.linear(x, layer.weight, layer.bias),
                               atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)
    if dtype == torch.float32:  # the control (bfloat16's is at the span level, above)
        assert not torch.equal(layer(x), layer(torch.cat([others, x]))[-1:])
