"""Steps/s of greedy generation through a chain of 1, 2 and 3 blockservers (real processes on
127.0.0.1, started by `corolla up`) against transformers generating locally in this process
with the same model, dtype and threads; and the time each extra hop adds per step.

    python bench/chain_speed.py [--models smollm2 llama-271m] [--dtype bfloat16] [--threads 2] [--tokens 128]

`llama-271m` is the common yardstick: a random Llama (hidden 1024, 16 layers, 16 heads,
intermediate 2816, vocab 32000), built once into ~/.cache/corolla/bench/."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import httpx
import torch
from common import corolla_up, model_reference, served_model

PROMPT = [1, 450, 7483, 310, 3444, 338]  # 6 token ids, the same for every model and run


def local_steps_per_s(model_dir: Path, dtype: str, tokens: int, threads: int, device: str = "cpu") -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor([PROMPT], device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    return tokens / (time.perf_counter() - started)


def chain_steps_per_s(model: str, servers: int, dtype: str, tokens: int, threads: int) -> float:
    with corolla_up(model, servers, dtype, 18000 + servers, threads) as url:
        # EOS banned so that every run makes exactly `tokens` steps
        body = {"model": served_model(url), "prompt": PROMPT, "temperature": 0, "logit_bias": {"2": -100, "0": -100}}
        httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 4}, timeout=600).raise_for_status()  # warm-up
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": tokens}, timeout=600)
        elapsed = time.perf_counter() - started
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == tokens, r.json()["usage"]
        return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-271m"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    print(f"greedy generation of {args.tokens} tokens, {args.dtype}, {args.threads} threads, CPU")
    print(f"{'model':12} {'run':24} {'steps/s':>8} {'ratio':>7} {'ms/step':>8}")
    for model in args.models:
        model_dir, reference = model_reference(model)
        local = local_steps_per_s(model_dir, args.dtype, args.tokens, args.threads)
        print(f"{model:12} {'transformers (local)':24} {local:8.2f} {1.0:7.2f} {1000 / local:8.1f}", flush=True)
        per_chain = {}
        for servers in args.servers:
            sps = chain_steps_per_s(reference, servers, args.dtype, args.tokens, args.threads)
            per_chain[servers] = sps
            print(f"{model:12} {f'chain of {servers} blockserver(s)':24} {sps:8.2f} {sps / local:7.2f} "
                  f"{1000 / sps:8.1f}", flush=True)
        if len(per_chain) > 1:
            first, last = min(per_chain), max(per_chain)
            hop_ms = (1000 / per_chain[last] - 1000 / per_chain[first]) / (last - first)
            print(f"{model:12} each extra hop adds {hop_ms:.1f} ms per step "
                  f"(gateway ⇄ blockserver round trip on 127.0.0.1)")


if __name__ == "__main__":
    main()
