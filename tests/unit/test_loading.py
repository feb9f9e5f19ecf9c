"""Loading spans and ends: only the span's layers are materialized; clear errors otherwise."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from shared.errors import BadRequest, UnsupportedModel
from shared.models.loader import family_for, load_ends, load_span


def test_span_loads_only_its_layers(tiny_dir):
    directory = tiny_dir("llama")
    whole = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in whole.model.layers]
    span = load_span(directory, 2, 4, dtype="float32")
    assert span.loaded_values == per_layer[2] + per_layer[3]
    assert len(span.layers) == 2
    assert not any(p.is_meta for p in span.layers.parameters())


def test_mixtral_experts_are_fused_on_load(tiny_dir):
    directory = tiny_dir("mixtral")
    assert any(".block_sparse_moe.experts.0.w1." in k for k in
               json.loads((tiny_dir("mixtral", sharded=True) / "model.safetensors.index.json").read_text())["weight_map"])
    span = load_span(directory, 0, 1, dtype="float32")
    assert span.layers[0].mlp.experts.gate_up_proj.shape[0] == 4


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModel) as info:
        family_for(GPT2Config())
    for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "falcon"):
        assert name in info.value.message


def test_span_outside_the_model_is_refused(tiny_dir):
    with pytest.raises(BadRequest, match="not within the model's 6 layers"):
        load_span(tiny_dir("llama"), 4, 7)


def test_bad_dtype_is_refused(tiny_dir):
    with pytest.raises(BadRequest, match="dtype must be one of"):
        load_span(tiny_dir("llama"), 0, 1, dtype="float8")


def test_bfloat16_span_and_ends(tiny_dir):
    directory = tiny_dir("qwen2")
    span = load_span(directory, 0, 6, dtype="bfloat16")
    ends = load_ends(directory, dtype="bfloat16")
    assert span.dtype == torch.bfloat16 and ends.embed.weight.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7]])
    cache = span.new_cache(1, 8)
    logits = ends.logits(span.step(ends.embed_tokens(ids), cache))
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.inference_mode():
        want = reference(ids).logits
    # bfloat16 keeps ~3 significant digits: the argmax matches, the values within 0.1
    assert torch.equal(logits.argmax(-1), want.argmax(-1))
    assert (logits - want).abs().max() < 0.1


def test_tied_head_shares_the_embedding(tiny_dir):
    ends = load_ends(tiny_dir("qwen2"), dtype="float32")  # qwen2 tiny model ties its head
    assert ends.head.weight.data_ptr() == ends.embed.weight.data_ptr()
    untied = load_ends(tiny_dir("llama"), dtype="float32")
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()


MEASURE = textwrap.dedent("""
    import json, sys, psutil, torch
    from shared.models.loader import load_span
    process = psutil.Process()
    before = process.memory_info().rss
    span = load_span(sys.argv[1], 0, int(sys.argv[2]), dtype="float32")
    cache = span.new_cache(1, 4)
    span.step(torch.zeros(1, 4, span.hidden_size), cache)  # touch every weight
    print(json.dumps({"rss": process.memory_info().rss - before, "values": span.loaded_values}))
""")


def test_span_memory_is_a_fraction_of_the_whole(tmp_path):
    """A span of 1 of 8 layers costs its own weights, not the model's (measured in fresh processes)."""
    from transformers import LlamaConfig

    # layers large enough (51 MB each) that the process's fixed overhead (~40 MB) does not blur them
    config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    layer_bytes = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024)

    def measure(layers):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), str(layers)], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    one, whole = measure(1), measure(8)
    assert one["values"] * 4 == layer_bytes and whole["values"] * 4 == 8 * layer_bytes
    # the whole model's layers take ~8 × 51 MB; one layer plus loader overhead stays far below
    assert whole["rss"] > 7 * layer_bytes
    assert whole["rss"] - one["rss"] > 6 * layer_bytes, (one, whole)  # the 7 other layers are really absent
    assert one["rss"] < whole["rss"] / 3, (one, whole)
