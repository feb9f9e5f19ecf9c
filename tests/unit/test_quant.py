"""Quantized weights (`--quant int8|int4|nf4`): the int8 and int4 kernels against fake-quantized
weights, their per-output bounds, memory accounting against what is allocated, batched steps, and verify-model's
verdicts per mode on every tiny family."""

import pytest
import torch

from corolla.verify import verify_model
from shared.errors import BadRequest
from shared.models.loader import layer_bytes, load_config, load_span
from shared.models.quant import Int4Linear, Int8Linear, check_quant, quantize_layer, stored_bytes
from shared.models.rows import DECODE, PREFILL, row_plan
from tests import tiny


def linear(out_features=96, in_features=64, bias=True) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight[3, 7] = 1.5  # an outlier weight: its row's scale is large
    return layer


def test_int8_equals_the_model_with_fake_quantized_weights():
    dense = linear()
    q = Int8Linear(dense)
    fake = q.weight_int8.float() * q.scale[:, None]
    assert (fake - dense.weight).abs().max() <= q.scale.max() / 2 + 1e-7
    x = torch.randn(5, 64)
    reference = torch.nn.functional.linear(x, fake, dense.bias)
    assert (q(x) - reference).abs().max() < 1e-4  # float32: the dequantize path
    # per output n: |y - y_dense| <= s_n / 2 * ||x||_1
    bound = q.scale[None, :] / 2 * x.abs().sum(dim=1, keepdim=True)
    assert ((q(x) - dense(x)).abs() <= bound + 1e-5).all()
    for rows in (1, 4, 16):  # bfloat16: the int8-weight kernel for a decode step's few rows, dequantize above
        xb = torch.randn(rows, 64).bfloat16()
        got = q(xb).float()
        want = torch.nn.functional.linear(xb.float(), fake, dense.bias)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_int8_has_gradients_for_its_inputs():
    q = Int8Linear(linear())
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    q(x).sum().backward()
    want = (q.weight_int8.float() * q.scale[:, None]).sum(0)
    assert (x.grad.float() - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("out_features,in_features", [(96, 64), (576, 576), (100, 96)])
def test_int4_equals_the_model_with_its_own_fake_quantized_weights(out_features, in_features):
    """The codes, scales and offsets are recomputed here from the definition (groups of inputs,
    min/max, 16 levels), independently of the kernel's packed layout, and every path (the int4
    kernel for decode rows, dequantization for prompts, autograd) computes x Ŵᵀ + b with them."""
    dense = linear(out_features, in_features)
    q = Int4Linear(dense)
    group = q.group_size
    assert group == (64 if in_features % 64 == 0 else 32)
    w = dense.weight.detach().reshape(out_features, -1, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    fake = (torch.round((w - low) / scale).clamp(0, 15) * scale + low).reshape(out_features, in_features)
    assert (fake - dense.weight).abs().max() <= scale.max() / 2 + 1e-6
    torch.testing.assert_close(q.dequantized(torch.float32), fake, atol=1e-6, rtol=0)
    for rows in (1, 3, 40):
        x = torch.randn(rows, in_features).bfloat16()
        want = torch.nn.functional.linear(x.float(), fake, dense.bias)
        tolerance = 0.02 * want.abs().max()
        for segments in ([(rows, DECODE)], [(rows, PREFILL)], None):
            with row_plan(segments):
                assert (q(x).float() - want).abs().max() <= tolerance, segments
    x = torch.randn(2, in_features, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, fake.sum(0).expand(2, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "falcon-7b", "bloom", "gemma2", "qwen3-moe"])
@pytest.mark.parametrize("quant", ["none", "int8", "int4", "nf4"])
def test_memory_accounting_matches_what_is_allocated(tiny_dir, family, quant):
    directory = tiny_dir(family)
    span = load_span(directory, 0, 2, dtype="bfloat16", quant=quant)
    per_layer = layer_bytes(load_config(directory), torch.bfloat16, quant)
    assert abs(stored_bytes(span.layers[0]) - per_layer) <= 0.01 * per_layer
    if quant != "none" and family != "qwen3-moe":  # fused MoE experts stay in the compute dtype
        dense = layer_bytes(load_config(directory), torch.bfloat16)
        # int4 on these 64-wide layers: groups of 32 and output rows padded to blocks of 64
        assert per_layer < dense * {"int8": 0.6, "int4": 0.6, "nf4": 0.35}[quant]


def test_quantized_batched_steps_equal_solo_steps(tiny_dir):
    span = load_span(tiny_dir("llama"), 0, 6, dtype="float32", quant="int8")
    torch.manual_seed(1)
    prompts = [torch.randn(1, n, 64) for n in (3, 7, 5)]
    solo_caches = [span.new_cache(1, 16) for _ in prompts]
    batch_caches = [span.new_cache(1, 16) for _ in prompts]
    for p, a, b in zip(prompts, solo_caches, batch_caches):
        span.step(p, a)
        span.step(p, b)
    steps = [torch.randn(1, 1, 64) for _ in prompts]
    solo = [span.step(x, c) for x, c in zip(steps, solo_caches)]
    batched = span.step_batch(steps, batch_caches, [None] * 3)
    assert max((s - b).abs().max().item() for s, b in zip(solo, batched)) < 1e-4


@pytest.mark.parametrize("family", ["llama", "phi3", "bloom", "falcon-7b"])
def test_nf4_equals_the_model_with_dequantized_weights(tiny_dir, family):
    """Structural: an nf4 span computes what the unquantized span computes with each Linear's
    weight replaced by bitsandbytes' dequantized NF4 (random tiny models say nothing about NF4's
    quality; SmolLM2's figures are in bench/quant.py)."""
    import bitsandbytes.functional as bnbf

    quantized = load_span(tiny_dir(family), 0, 6, dtype="float32", quant="nf4")
    dense = load_span(tiny_dir(family), 0, 6, dtype="float32")
    modules = dict(quantized.layers.named_modules())
    with torch.no_grad():
        for name, module in dense.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight = modules[name].weight  # before its first forward packs it for the CPU kernel
                module.weight.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state).float())
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    got, want = quantized.step(x, quantized.new_cache(2, 8)), dense.step(x, dense.new_cache(2, 8))
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # the CPU kernel rounds activations to bf16


@pytest.mark.parametrize("family", list(tiny.configs()))
def test_verify_model_passes_int8_on_every_family(tiny_dir, family):
    report = verify_model(tiny_dir(family), spans=3, steps=10, dtype="bfloat16", quant="int8")
    assert report.ok, report.render()
    assert report.quant == "int8" and "quant int8" in report.render()


def test_unknown_or_impossible_modes_are_refused_before_loading():
    with pytest.raises(BadRequest, match="unknown quantization"):
        check_quant("int3", "cpu")
    with pytest.raises(BadRequest, match="on a GPU use --quant nf4"):
        check_quant("int4", "cuda")
    layer = torch.nn.Sequential(torch.nn.Linear(64, 64))
    assert isinstance(quantize_layer(layer, "int8", "cpu", torch.float32)[0], Int8Linear)
    assert type(quantize_layer(torch.nn.Sequential(torch.nn.Linear(64, 64)), "none", "cpu",
                               torch.float32)[0]) is torch.nn.Linear
