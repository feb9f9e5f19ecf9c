"""What --verify-rate costs: greedy generation through a local swarm (2 spans x 2 replicas, real
processes on 127.0.0.1) with the gateway repeating a fraction of steps on the other replica, as
steps/s and as a ratio to the same swarm with verification off (rate 0). A verified step costs a
stateless pass over every input the hop has seen so far, so the cost grows with the position.

    python -m bench.verify [--model smollm2] [--tokens 64] [--rates 0 0.05 0.2] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from corolla.local import LocalSwarm
from shared.models.loader import load_config, num_layers
from shared.models.resolve import resolve_model, served_name
from shared.records import even_spans


def generate(url: str, model: str, tokens: int) -> float:
    body = {"model": model, "prompt": "The history of the bicycle begins", "max_tokens": tokens, "temperature": 0,
            "logit_bias": {"2": -100, "0": -100}}
    started = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    directory = resolve_model(args.model)
    name = served_name(args.model, directory)
    spans = [str(s) for s in even_spans(num_layers(load_config(directory)), 2)]
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for rate in args.rates:
            swarm = LocalSwarm(args.model, Path(logs), gateway_args=["--verify-rate", str(rate), "--dtype",
                                                                     "bfloat16"],
                               blockserver_args=["--dtype", "bfloat16", "--num-threads", "1"], model_name=name)
            try:
                swarm.start(spans + spans, timeout_s=300)
                generate(swarm.url, name, 4)  # warm up
                speeds = sorted(generate(swarm.url, name, args.tokens) for _ in range(args.runs))
                checks = httpx.get(f"{swarm.url}/v1/swarm", timeout=10).json()["verification"]
                results[rate] = (speeds[len(speeds) // 2], checks)
            finally:
                swarm.stop()
    base = results[args.rates[0]][0]
    print(f"{name}, {args.tokens} tokens, median of {args.runs} runs, 2 spans x 2 replicas, bfloat16")
    print(f"{'verify rate':>12} {'steps/s':>8} {'ratio':>6}  checks (verification counters)")
    for rate, (speed, checks) in results.items():
        print(f"{rate:>12.2f} {speed:>8.2f} {speed / base:>6.2f}  {checks}")


if __name__ == "__main__":
    main()
