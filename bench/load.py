"""Many users at once against a local swarm (`corolla up`'s layout: a gateway and 3 blockservers
of SmolLM2 on this machine): concurrent clients send a mix of chats and completions, streamed and
not, greedy; a share of them leave at a random point (a stream closed after a few events, a
request abandoned after a random wait). Prints what completed, what was refused (429) and what
failed (must be nothing else), whether every completed greedy answer equals the same request run
alone, whether every blockserver's free cache is back to its start, and the gateway's memory.

    python bench/load.py [--clients 64] [--seconds 120] [--leave 0.2] [--url URL]

Without --url it starts its own swarm, in `corolla up`'s default dtype (SmolLM2's float32: greedy
answers then equal lone runs; in bfloat16 a batched product rounds differently from a solo one and
greedy decoding may flip at near-ties, as in any batching server), one torch thread per process."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from corolla.local import LocalSwarm

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
             "Say hello in Spanish.", "What is the largest planet?", "Who wrote Hamlet?"]
PROMPTS = ["Once upon a time", "The three laws of robotics are", "def fibonacci(n):", "The recipe for bread:"]


def templates() -> list[tuple[str, dict]]:
    """(path, body) of each kind of request; greedy, so each has one right answer."""
    out = [("/v1/chat/completions", {"messages": [{"role": "user", "content": q}], "max_tokens": 40})
           for q in QUESTIONS]
    out += [("/v1/chat/completions", {"messages": [{"role": "user", "content": q}]}) for q in QUESTIONS[:2]]  # no limit
    out += [("/v1/completions", {"prompt": p, "max_tokens": 32}) for p in PROMPTS]
    return [(path, {"model": MODEL, "temperature": 0} | body) for path, body in out]


def text_of(path: str, payload: dict) -> str:
    choice = payload["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


async def ask(client: httpx.AsyncClient, path: str, body: dict, stream: bool, leave_after: float | None,
              leave_events: int | None) -> tuple[str, str | None]:
    """('ok', text) | ('left', None) | ('429', None) | ('error', detail)."""
    if not stream:
        request = client.post(path, json=body)
        try:
            r = await (asyncio.wait_for(request, leave_after) if leave_after else request)
        except TimeoutError:
            return "left", None
        if r.status_code == 429:
            return "429", None
        if r.status_code != 200:
            return "error", f"{r.status_code} {r.text[:200]}"
        return "ok", text_of(path, r.json())
    pieces, events = [], 0
    async with client.stream("POST", path, json=body | {"stream": True}) as r:
        if r.status_code == 429:
            return "429", None
        if r.status_code != 200:
            return "error", f"{r.status_code} {(await r.aread())[:200]!r}"
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return "error", str(chunk["error"])
            events += 1
            if leave_events is not None and events >= leave_events:
                return "left", None  # leaving the block closes the connection mid-stream
            for c in chunk["choices"]:
                pieces.append(c.get("text") or c.get("delta", {}).get("content") or "")
    return "ok", "".join(pieces)


async def run(url: str, clients: int, seconds: float, leave: float, seed: int) -> dict:
    kinds = templates()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        expected = {}
        for i, (path, body) in enumerate(kinds):  # each request alone, first
            status, text = await ask(client, path, body, False, None, None)
            assert status == "ok", text
            expected[i] = text
        counts, mismatches, errors = Counter(), [], []
        latencies = []
        deadline = time.monotonic() + seconds

        async def user(number: int) -> None:
            rng = random.Random(seed * 1000 + number)
            while time.monotonic() < deadline:
                i = rng.randrange(len(kinds))
                path, body = kinds[i]
                stream = rng.random() < 0.5
                leaving = rng.random() < leave
                started = time.monotonic()
                status, text = await ask(client, path, body, stream,
                                         rng.uniform(0.1, 3.0) if leaving and not stream else None,
                                         rng.randint(1, 8) if leaving and stream else None)
                counts[status] += 1
                if status == "ok":
                    latencies.append(time.monotonic() - started)
                    if text != expected[i]:
                        mismatches.append((i, text, expected[i]))
                elif status == "error":
                    errors.append(text)
                elif status == "429":
                    await asyncio.sleep(1.0)  # what a client does: wait (Retry-After) and try again

        await asyncio.gather(*(user(n) for n in range(clients)))
    return {"counts": counts, "mismatches": mismatches, "errors": errors, "latencies": latencies}


def free_cache(url: str) -> list[tuple[int, int]]:
    servers = httpx.get(f"{url}/v1/swarm", timeout=10).json()["servers"]
    return [(s["cache_tokens_left"], s["sessions"]) for s in
            (httpx.get(f"{x['url']}/health", timeout=10).json() for x in servers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--leave", type=float, default=0.2, help="share of requests whose client leaves early")
    parser.add_argument("--url", default=None, help="an existing gateway (default: start a local swarm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="blockservers' and gateway's dtype (default: the model's)")
    args = parser.parse_args()
    swarm = None
    if args.url is None:
        dtype = ["--dtype", args.dtype]
        swarm = LocalSwarm("smollm2", Path(tempfile.mkdtemp(prefix="corolla-load-")), model_name=MODEL,
                           blockserver_args=dtype + ["--num-threads", "1"],
                           gateway_args=(dtype if args.dtype != "auto" else []) + ["--num-threads", "1"])
        swarm.start(["0:10", "10:20", "20:30"], timeout_s=600)
    url = args.url or swarm.url
    try:
        gateway = psutil.Process(swarm.gateway.pid) if swarm else None
        rss_before = gateway.memory_info().rss if gateway else 0
        cache_before = free_cache(url)
        started = time.monotonic()
        result = asyncio.run(run(url, args.clients, args.seconds, args.leave, args.seed))
        elapsed = time.monotonic() - started
        time.sleep(2.0)  # cleanup of the last leavers
        cache_after = free_cache(url)
        rss_after = gateway.memory_info().rss if gateway else 0
        health = httpx.get(f"{url}/health", timeout=10).json()
        counts, lat = result["counts"], sorted(result["latencies"]) or [0.0]
        print(f"{args.clients} clients for {args.seconds:.0f}s ({elapsed:.0f}s with the last requests), "
              f"{args.leave:.0%} leaving early; SmolLM2 ({args.dtype}), 3 blockservers, this machine")
        print(f"{'requests completed':32} {counts['ok']}")
        print(f"{'clients that left early':32} {counts['left']}")
        print(f"{'refused with 429 (retried)':32} {counts['429']}")
        print(f"{'errors (must be 0)':32} {counts['error']}" + (f"  e.g. {result['errors'][0]}" if result['errors'] else ""))
        print(f"{'answers identical to a lone run':32} {counts['ok'] - len(result['mismatches'])}/{counts['ok']}")
        print(f"{'latency p50 / p99 (completed)':32} {lat[len(lat) // 2]:.1f}s / {lat[int(len(lat) * 0.99)]:.1f}s")
        print(f"{'blockserver free cache start':32} {[c for c, _ in cache_before]}")
        print(f"{'blockserver free cache end':32} {[c for c, _ in cache_after]}  sessions {[s for _, s in cache_after]}"
              f"  {'(equal)' if cache_after == cache_before else '(DIFFERENT)'}")
        print(f"{'bans, failures, preemptions':32} {len(health['banned'])}, {health['failover']['failures']}, "
              f"{health['failover']['preemptions']}")
        if gateway:
            print(f"{'gateway memory before / after':32} {rss_before / 2**20:.0f} MiB / {rss_after / 2**20:.0f} MiB")
    finally:
        if swarm:
            swarm.stop()


if __name__ == "__main__":
    main()
