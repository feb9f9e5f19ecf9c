"""Spans of every family, chained, against the whole transformers model (the backbone of Corolla).

Tolerance: float32 logits within atol 1e-4 of the whole model, identical argmax at every step.
The reference is the whole model run from scratch on the full (left-padded) sequences, with the
position ids `generate` uses; the chain runs incrementally with per-span KV caches."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.models.loader import load_ends, load_span
from tests import tiny

ATOL = 1e-4
FAMILIES = list(tiny.configs())
SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 1), (1, 4), (4, 6)]}


class Chain:
    """Spans run in order with one cache each, as the gateway drives blockservers."""

    def __init__(self, directory, bounds, batch_size, max_length=96):
        self.spans = [load_span(directory, a, b, dtype="float32") for a, b in bounds]
        self.ends = load_ends(directory, dtype="float32")
        self.caches = [s.new_cache(batch_size, max_length) for s in self.spans]

    def step(self, ids, mask=None):
        hidden = self.ends.embed_tokens(ids)
        for span, cache in zip(self.spans, self.caches):
            hidden = span.step(hidden, cache, mask)
        return self.ends.logits(hidden)[:, -1]

    def truncate(self, position):
        for cache in self.caches:
            cache.truncate(position)

    def reorder(self, hypo_ids):
        for cache in self.caches:
            cache.reorder(hypo_ids)


class Reference:
    def __init__(self, directory, family):
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.takes_positions = family != "bloom"  # BLOOM's positions are its alibi, from the mask

    @torch.inference_mode()
    def last_logits(self, ids, mask):
        kwargs = {}
        if self.takes_positions:
            positions = mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = positions.masked_fill(mask == 0, 1)
        return self.model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]


def left_padded_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, tiny.VOCAB, (3, 10), generator=generator)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def assert_close(got, want, what):
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{what}: max |Δlogit| {diff:.3g} > {ATOL}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), f"{what}: argmax differs"


def run_and_compare(chain, ref, ids, mask, new_ids, new_mask, what):
    """Send new tokens through the chain; compare with the reference on the whole sequence."""
    got = chain.step(new_ids, new_mask)
    want = ref.last_logits(ids, mask)
    assert_close(got, want, what)
    return got


def prefill_and_decode(chain, ref, ids, mask, steps, what):
    """Prefill the batch, then `steps` greedy decode steps, comparing every step's logits."""
    logits = run_and_compare(chain, ref, ids, mask, ids, mask, f"{what} prefill")
    for step in range(steps):
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        logits = run_and_compare(chain, ref, ids, mask, token, None, f"{what} step {step}")
    return ids, mask, logits


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_chain_matches_whole_model(tiny_dir, family, parts):
    directory = tiny_dir(family)
    chain, ref = Chain(directory, SPLITS[parts], batch_size=3), Reference(directory, family)
    ids, mask = left_padded_batch()

    # prefill, then 22 greedy decode steps (past the 8-token sliding windows)
    ids, mask, logits = prefill_and_decode(chain, ref, ids, mask, 22, f"{family}/{parts}")

    # beam-style reorder: rows 0 and 1 continue from the old row 2, row 2 from the old row 0
    hypo_ids = torch.tensor([2, 2, 0])
    chain.reorder(hypo_ids)
    ids, mask, logits = ids[hypo_ids], mask[hypo_ids], logits[hypo_ids]
    for step in range(3):
        token = logits.topk(3, dim=-1).indices[:, step: step + 1]  # diverging beams
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        logits = run_and_compare(chain, ref, ids, mask, token, None, f"{family}/{parts} beam {step}")

    # rollback: forget the last 5 tokens, then continue with two other tokens in one step
    position = ids.shape[1] - 5
    chain.truncate(position)
    other = torch.tensor([[5, 6], [7, 8], [9, 10]])
    ids = torch.cat([ids[:, :position], other], 1)
    mask = torch.cat([mask[:, :position], torch.ones_like(other)], 1)
    run_and_compare(chain, ref, ids, mask, other, None, f"{family}/{parts} after rollback")


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint(tiny_dir, family):
    directory = tiny_dir(family, sharded=True)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 2
    chain, ref = Chain(directory, SPLITS[3], batch_size=3), Reference(directory, family)
    ids, mask = left_padded_batch()
    prefill_and_decode(chain, ref, ids, mask, 20, f"{family} sharded")


def _max_diff_over_generation(chain, ref, ids, mask, steps, chain_mask):
    """Greedy generation following the reference; return the largest logit difference seen."""
    worst = (chain.step(ids, chain_mask(mask)) - ref.last_logits(ids, mask)).abs().max().item()
    for _ in range(steps):
        token = ref.last_logits(ids, mask).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        worst = max(worst, (chain.step(token, None) - ref.last_logits(ids, mask)).abs().max().item())
    return worst


def test_comparison_detects_a_missing_sliding_window(tiny_dir):
    """The same comparison fails when the span forgets Mistral's sliding window."""
    directory = tiny_dir("mistral")
    ids, mask = left_padded_batch()
    ref = Reference(directory, "mistral")
    exact = Chain(directory, SPLITS[2], batch_size=3)
    assert _max_diff_over_generation(exact, ref, ids, mask, 12, lambda m: m) <= ATOL
    broken = Chain(directory, SPLITS[2], batch_size=3)
    for span in broken.spans:
        span.windows = [None] * len(span.windows)
    assert _max_diff_over_generation(broken, ref, ids, mask, 12, lambda m: m) > 100 * ATOL


def test_comparison_detects_a_missing_padding_mask(tiny_dir):
    directory = tiny_dir("llama")
    ids, mask = left_padded_batch()
    ref = Reference(directory, "llama")
    broken = Chain(directory, SPLITS[2], batch_size=3)
    assert _max_diff_over_generation(broken, ref, ids, mask, 3, lambda m: None) > 100 * ATOL
