"""The CUDA paths (`--device cuda`, float16/bfloat16, bitsandbytes int8 and nf4): spans on the GPU
against the same spans on the CPU. Skipped on machines without a GPU (CI); bench/gpu_check.sh
runs them on one."""

import pytest
import torch

from corolla.verify import verify_model
from shared.models.loader import layer_bytes, load_config, load_span
from shared.models.quant import stored_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral", "bloom", "falcon-new"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_spans_on_the_gpu_equal_the_cpu(tiny_dir, family, dtype):
    directory = tiny_dir(family)
    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    reference = load_span(directory, 0, 6, "cpu", "float32")
    want = reference.step(x, reference.new_cache(2, 8))
    gpu = load_span(directory, 0, 6, "cuda", dtype)
    got = gpu.step(x, gpu.new_cache(2, 8)).float().cpu()
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_bitsandbytes_weights_on_the_gpu(tiny_dir, quant):
    directory = tiny_dir("llama")
    span = load_span(directory, 0, 6, "cuda", "bfloat16", quant=quant)
    per_layer = layer_bytes(load_config(directory), torch.bfloat16, quant)
    assert abs(stored_bytes(span.layers[0]) - per_layer) <= 0.01 * per_layer
    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    dense = load_span(directory, 0, 6, "cpu", "float32")
    want = dense.step(x, dense.new_cache(2, 8))
    got = span.step(x, span.new_cache(2, 8)).float().cpu()
    assert (got - want).abs().max() <= (0.1 if quant == "int8" else 0.3) * want.abs().max()
    batched = span.step_batch([torch.randn(1, 1, 64) for _ in range(3)], [span.new_cache(1, 4) for _ in range(3)],
                              [None] * 3)
    assert all(torch.isfinite(b).all() for b in batched)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_verify_model_on_the_gpu(tiny_dir, dtype):
    report = verify_model(tiny_dir("qwen2"), spans=3, steps=10, dtype=dtype, device="cuda")
    assert report.ok, report.render()
