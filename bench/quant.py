"""Quantized weights and the dyn8 wire codec, per mode: memory per layer, greedy steps/s through
`corolla up` (3 blockservers) on the 271M yardstick against local transformers (bfloat16, same
threads), and what each costs in logits on SmolLM2 (verify-model against the unquantized model).

    python bench/quant.py [--modes none int8 nf4] [--tokens 64] [--threads 2] [--skip-speed]
                          [--device cuda] [--dtype float16]

Memory per layer is what the loaded layer really holds (shared/models/quant.py stored_bytes),
next to what memory accounting predicts. The wire table prints bytes per decode step and per
128-token prefill chunk per hop, raw bfloat16 against dyn8, for both models' hidden sizes."""

from __future__ import annotations

import argparse
import os

import httpx
import torch
from chain_speed import PROMPT, local_steps_per_s
from common import corolla_up, served_model, yardstick

from corolla.verify import verify_model
from shared import protocol
from shared.models.loader import layer_bytes, load_config, load_span
from shared.models.quant import stored_bytes
from shared.models.resolve import resolve_model


def chain_steps_per_s(model: str, dtype: str, extra: list[str], tokens: int, threads: int, port: int) -> float:
    import time

    with corolla_up(model, 3, dtype, port, threads, extra) as url:
        body = {"model": served_model(url), "prompt": PROMPT, "temperature": 0, "logit_bias": {"2": -100, "0": -100}}
        httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 4}, timeout=600).raise_for_status()
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": tokens}, timeout=600)
        elapsed = time.perf_counter() - started
        r.raise_for_status()
        return tokens / elapsed


def frame_bytes(hidden_size: int, tokens: int, codec: str) -> int:
    hidden = torch.randn(1, tokens, hidden_size).bfloat16()
    return len(protocol.encode(protocol.Step(step_id=1000, position=1000), {"hidden": hidden}, codec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "nf4"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="teacher-forced steps of verify-model on SmolLM2")
    parser.add_argument("--skip-speed", action="store_true", help="only memory and logits (no swarms)")
    parser.add_argument("--device", default="cpu", help="blockservers' device (the local baseline runs there too)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    big, smol = yardstick(), resolve_model("smollm2")
    config = load_config(big)
    print(f"{args.dtype} compute, {args.threads} threads, {args.device}; yardstick {big.name}, logits on "
          f"SmolLM2-135M")
    local = None if args.skip_speed else local_steps_per_s(big, args.dtype, args.tokens, args.threads, args.device)
    if local:
        print(f"transformers (local) on the yardstick: {local:.2f} steps/s")
    print(f"{'mode':6} {'MiB/layer':>9} {'predicted':>9} {'steps/s':>8} {'ratio':>6} {'max|Δlogit|':>11} "
          f"{'of max':>7} {'greedy agree':>12} {'verdict':>7}")
    for i, mode in enumerate(args.modes):
        layer = load_span(big, 0, 1, args.device, args.dtype, quant=mode).layers[0]
        real, predicted = stored_bytes(layer) / 2**20, layer_bytes(config, getattr(torch, args.dtype), mode) / 2**20
        del layer
        sps = None if args.skip_speed else chain_steps_per_s(str(big), args.dtype, ["--quant", mode, "--device",
                                                                                    args.device],
                                                              args.tokens, args.threads, 18100 + i)
        report = verify_model(smol, spans=3, steps=args.steps, dtype=args.dtype, quant=mode, device=args.device)
        speed = f"{sps:8.2f} {sps / local:6.2f}" if sps else f"{'–':>8} {'–':>6}"
        share = f"{report.max_abs_diff / report.logit_scale:7.1%}"
        print(f"{mode:6} {real:9.2f} {predicted:9.2f} {speed} {report.max_abs_diff:11.3f} {share} "
              f"{report.agreement:12.1%} {'PASS' if report.ok else 'FAIL':>7}", flush=True)
    print()
    print("bytes on the wire per hop and direction (one frame, header included)")
    print(f"{'hidden':>6} {'tokens':>6} {'bf16 raw':>9} {'dyn8':>7} {'ratio':>6}")
    for hidden_size in (576, config.hidden_size):
        for tokens in (1, 128):
            raw, dyn = frame_bytes(hidden_size, tokens, "raw"), frame_bytes(hidden_size, tokens, "dyn8")
            print(f"{hidden_size:6} {tokens:6} {raw:9} {dyn:7} {dyn / raw:6.2f}")


if __name__ == "__main__":
    main()
