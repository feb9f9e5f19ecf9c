"""How close one decode step of a span comes to the memory bound, per dtype and quantization.

A 7B-shaped Llama stack (hidden 4096, 32 heads, 8 KV heads, MLP 11008; random weights, 4 layers
by default) runs one-token steps of one session over a 128-token cache, as a blockserver runs
them (batch-invariant tiles on, or off with --no-batch-invariant). A decode step must read every
weight once, so its bound is the weights' bytes over the machine's memory bandwidth, measured in
the same run (a large tensor copy: bytes read + written per second). The baseline is the same
stack run by `transformers` itself (its decoder layers called directly with a DynamicCache), same
dtype, same threads.

    python bench/layer_speed.py [--layers 4] [--threads 2] [--steps 12]
                                [--configs bfloat16 float32 bfloat16+int8 bfloat16+int4]

Columns: ms per step, GB/s of weights read, the fraction of the memory bound reached, and the
step's speed against transformers on the same (unquantized) weights."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig

from shared.models.loader import random_layer
from shared.models.quant import stored_bytes

SHAPE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=11008,
             vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
CONTEXT = 128


def bandwidth_gbs(repeats: int = 5) -> float:
    """Memory copy bandwidth, bytes read + written per second (GB/s), 1 GiB buffers."""
    src = torch.empty(2**28, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def span_of(config, layers: int, dtype: torch.dtype, quant: str, invariant: bool):
    torch.manual_seed(0)
    parts = [random_layer(config, "cpu", dtype, quant) for _ in range(layers)]
    span = parts[0]
    span.layers = torch.nn.ModuleList([p.layers[0] for p in parts])
    span.end = layers
    span.windows = span.windows * layers
    span.batch_invariant = invariant
    return span


def corolla_ms(span, steps: int) -> float:
    cache = span.new_cache(1, CONTEXT + steps + 8)
    span.step(torch.randn(1, CONTEXT, span.hidden_size, dtype=span.dtype), cache)
    times = []
    for _ in range(steps):
        x = torch.randn(1, 1, span.hidden_size, dtype=span.dtype)
        times.append(_timed(lambda x=x: span.step(x, cache)))
    return statistics.median(times[2:]) * 1e3


@torch.inference_mode()
def transformers_ms(span, steps: int) -> float:
    """The same layers called as transformers' LlamaModel calls them (eager attention, DynamicCache)."""
    config, layers = span.config, span.layers
    rotary = span.rotary
    caches = [DynamicCache(config=config) for _ in layers]  # every random layer is a "layer 0"
    hidden = torch.randn(1, CONTEXT, span.hidden_size, dtype=span.dtype)

    def run(x, start):
        positions = torch.arange(start, start + x.shape[1])[None]
        embeddings = rotary(x, positions)
        mask = None
        if x.shape[1] > 1:
            mask = torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype).triu(1)[None, None]
        for layer, cache in zip(layers, caches):
            x = layer(x, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                      position_embeddings=embeddings)
            x = x[0] if isinstance(x, tuple) else x
        return x

    run(hidden, 0)
    times = []
    for i in range(steps):
        x = torch.randn(1, 1, span.hidden_size, dtype=span.dtype)
        times.append(_timed(lambda x=x, i=i: run(x, CONTEXT + i)))
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--configs", nargs="+", default=["bfloat16", "float32", "bfloat16+int8", "bfloat16+int4"],
                        help="DTYPE or DTYPE+QUANT")
    parser.add_argument("--no-batch-invariant", dest="invariant", action="store_false",
                        help="plain products instead of fixed tiles (what batch invariance costs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = LlamaConfig(num_hidden_layers=args.layers, **SHAPE)
    config._attn_implementation = "sdpa"
    bandwidth = bandwidth_gbs()
    print(f"7B-shaped Llama, {args.layers} layers, {args.threads} threads, one session, {CONTEXT}-token cache, "
          f"batch-invariant {'on' if args.invariant else 'off'}")
    print(f"memory bandwidth (copy, read + write): {bandwidth:.1f} GB/s")
    print(f"{'config':16} {'MB weights':>10} {'bound ms':>8} {'ms/step':>8} {'GB/s':>6} {'of bound':>8} "
          f"{'transformers ms':>15} {'ratio':>6}")
    baselines: dict[torch.dtype, float] = {}
    for spec in args.configs:
        dtype_name, _, quant = spec.partition("+")
        dtype, quant = getattr(torch, dtype_name), quant or "none"
        span = span_of(config, args.layers, dtype, quant, args.invariant)
        weights = sum(stored_bytes(layer) for layer in span.layers)
        ms = corolla_ms(span, args.steps)
        if dtype not in baselines:
            plain = span if quant == "none" else span_of(config, args.layers, dtype, "none", False)
            baselines[dtype] = transformers_ms(plain, args.steps)
            del plain
        bound = weights / (bandwidth * 1e9) * 1e3
        base = baselines[dtype]
        print(f"{spec:16} {weights / 1e6:10.0f} {bound:8.1f} {ms:8.1f} {weights / ms / 1e6:6.1f} {bound / ms:8.2f} "
              f"{base:15.1f} {base / ms:6.2f}", flush=True)
        del span


if __name__ == "__main__":
    main()
