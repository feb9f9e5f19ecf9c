"""The compiled decode step (shared/models/compiled.py): within the eager path's tolerance of it
(and so of transformers), batch-invariant bit for bit, and all-or-nothing when a part fails.

Compiling takes about 10 s per row bucket for these 2-layer spans, so each dtype compiles once."""

import pytest
import torch

from shared.models.compiled import not_compilable
from shared.models.loader import load_ends, load_span
from tests.unit.test_invariance import differing_steps

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}  # relative to the hidden states' largest value


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def spans(request, smollm2_shaped):
    eager = load_span(smollm2_shaped, 0, 2, dtype=request.param)
    compiled = load_span(smollm2_shaped, 0, 2, dtype=request.param)
    assert not_compilable(compiled) is None
    compiled.compile_decode()
    return request.param, eager, compiled


def test_compiled_steps_match_eager_steps(spans):
    dtype, eager, compiled = spans
    torch.manual_seed(3)
    prompt = torch.randn(2, 9, 576, dtype=eager.dtype)
    steps = [torch.randn(2, 1, 576, dtype=eager.dtype) for _ in range(12)]
    outputs = []
    for span in (eager, compiled):
        cache = span.new_cache(2, 64)
        span.step_batch([prompt], [cache], [None])
        outputs.append([span.step_batch([x], [cache], [None])[0] for x in steps])
    runs = compiled.compiled.runs
    assert runs >= len(steps)  # the compiled graph really ran them
    for want, got in zip(*outputs):
        scale = want.float().abs().max().item()
        assert (want.float() - got.float()).abs().max().item() <= TOLERANCE[dtype] * scale


def test_compiled_batched_steps_equal_solo_steps_bit_for_bit(spans):
    _, _, compiled = spans
    before = compiled.compiled.runs
    assert differing_steps(compiled) == []
    assert compiled.compiled.runs > before


def test_a_failing_part_leaves_every_session_where_it_was(spans, monkeypatch):
    _, _, span = spans
    caches = [span.new_cache(1, 32) for _ in range(6)]  # 6 rows: two buckets' worth
    span.step_batch([torch.randn(1, 3, 576, dtype=span.dtype) for _ in caches], caches, [None] * 6)
    calls = []
    real = span.compiled.run

    def second_part_fails(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(span.compiled, "run", second_part_fails)
    with pytest.raises(RuntimeError, match="boom"):
        span.step_batch([torch.randn(1, 1, 576, dtype=span.dtype) for _ in caches], caches, [None] * 6)
    assert [c.length for c in caches] == [3] * 6


def test_what_is_not_compiled_says_why(tiny_dir):
    assert "bloom" in not_compilable(load_span(tiny_dir("bloom"), 0, 2, dtype="float32"))
    assert "int8" in not_compilable(load_span(tiny_dir("llama"), 0, 2, dtype="bfloat16", quant="int8"))


def test_compiled_head_matches_eager_and_keeps_rows_apart(smollm2_shaped):
    ends = load_ends(smollm2_shaped, "cpu", "bfloat16")
    torch.manual_seed(4)
    hidden = torch.randn(7, 1, 576, dtype=torch.bfloat16)
    eager = ends.logits(hidden)
    ends.compile_head()
    alone = torch.cat([ends.logits(hidden[i:i + 1]) for i in range(7)])
    together = ends.logits(hidden)  # 7 rows: passes of 4 and 3
    assert ends.compiled_head.runs >= 9
    assert torch.equal(alone, together)
    assert (alone - eager).abs().max().item() <= 3e-2 * eager.abs().max().item()
    assert torch.equal(alone.argmax(-1), eager.argmax(-1))


def test_memory_sizing_counts_the_compiled_graphs(smollm2_shaped):
    """--max-memory holds the compiled graphs' prepacked weights too, so fewer layers fit; spans
    that are not compiled (here: int8) are sized as before."""
    from dataclasses import replace

    from blockserver.service import layers_for_memory
    from blockserver.settings import BlockserverSettings
    from shared.models.loader import load_facts

    facts = replace(load_facts(smollm2_shaped), num_layers=10_000)  # as if deep enough for the budget to decide

    def sized(**kw) -> int:
        return layers_for_memory(facts, BlockserverSettings(max_memory_gib=0.5, cache_tokens=16, dtype="bfloat16",
                                                            **kw))

    assert 1 <= sized(compile=True) < sized(compile=False) / 4
    assert sized(compile=True, quant="int8") == sized(compile=False, quant="int8")


@pytest.mark.parametrize("family,start,end", [("qwen2", 3, 5), ("phi3", 0, 2)])  # Qwen2 slides from layer 3
def test_windows_and_fused_projections_compile_exactly(tiny_dir, family, start, end):
    """Sliding windows (masks per session, inside the custom op) and Phi-3's fused projections:
    compiled float32 decode steps within 1e-4 of the eager ones, past the window."""
    eager = load_span(tiny_dir(family), start, end, dtype="float32")
    compiled = load_span(tiny_dir(family), start, end, dtype="float32")
    assert family != "qwen2" or set(compiled.windows) == {8}
    compiled.compile_decode()
    torch.manual_seed(5)
    prompt = torch.randn(1, 5, eager.hidden_size)
    steps = [torch.randn(1, 1, eager.hidden_size) for _ in range(12)]  # past the window of 8
    outputs = []
    for span in (eager, compiled):
        cache = span.new_cache(1, 32)
        span.step_batch([prompt], [cache], [None])
        outputs.append([span.step_batch([x], [cache], [None])[0] for x in steps])
    assert compiled.compiled.runs >= len(steps) + 2  # warm-up's 2 buckets, then every step
    for want, got in zip(*outputs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
