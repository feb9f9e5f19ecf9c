"""Concurrent greedy streams against a local swarm (`corolla up`: a gateway and 3 blockservers on
this machine, bfloat16): aggregate tokens/s as a multiple of one stream's, inter-token latency
(p50, p99 over every gap of every stream) and time to first token.

    python bench/concurrency.py [--models smollm2 llama-271m] [--streams 1 4 16 64] [--tokens 64]

Every stream asks for the same number of tokens (EOS banned), streamed; all start together."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
from common import corolla_up, model_reference, served_model

PROMPTS = [[1, 450, 7483, 310, 3444, 338], [1, 415, 2501, 3348, 29892], [1, 1724, 338, 278, 7483],
           [1, 910, 338, 263, 1243, 310, 278]]  # token ids, the same for every model and run


async def stream(client: httpx.AsyncClient, body: dict) -> tuple[float, list[float], int]:
    """(time to first token, inter-token gaps, tokens) of one streamed completion."""
    started = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


async def measure(url: str, streams: int, tokens: int) -> dict:
    name = served_model(url)
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        bodies = [{"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0,
                   "stream": True, "logit_bias": {"2": -100, "0": -100}} for i in range(streams)]
        await stream(client, bodies[0] | {"max_tokens": 4})  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(*(stream(client, b) for b in bodies))
        elapsed = time.perf_counter() - started
    gaps = sorted(g for _, gs, _ in results for g in gs)
    return {"tokens_per_s": sum(n for _, _, n in results) / elapsed,
            "itl_p50": gaps[len(gaps) // 2], "itl_p99": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
            "ttft_p50": statistics.median(t for t, _, _ in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-271m"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(f"{args.tokens} tokens per stream, greedy, {args.dtype}, corolla up (gateway + 3 blockservers), CPU")
    print(f"{'model':12} {'streams':>7} {'tok/s':>8} {'x one':>6} {'ITL p50':>8} {'ITL p99':>8} {'TTFT p50':>9}")
    for model in args.models:
        _, reference = model_reference(model)
        with corolla_up(reference, 3, args.dtype, 18100) as url:
            single = None
            for n in args.streams:
                r = asyncio.run(measure(url, n, args.tokens))
                single = single or r["tokens_per_s"]
                print(f"{model:12} {n:7d} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / single:6.2f} "
                      f"{r['itl_p50'] * 1000:6.0f}ms {r['itl_p99'] * 1000:6.0f}ms {r['ttft_p50'] * 1000:7.0f}ms",
                      flush=True)


if __name__ == "__main__":
    main()
