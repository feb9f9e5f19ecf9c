"""The paper's fault-tolerance comparison on a local swarm: steps/s of greedy generation when each
step fails with probability p (the busy blockserver of a random span is killed with SIGKILL and a
replica takes over), against restarting the generation from scratch on every failure.

    python bench/failover.py [--model smollm2] [--tokens 128] [--probabilities 0 0.01 0.05]
                             [--replicas 2] [--restart-budget 180]

The swarm: a gateway and `replicas` blockservers per span (3 spans), real processes on 127.0.0.1.
Every killed server is replaced by a freshly started one (at low CPU priority), so each span keeps
its replicas. The paper reports 3.38 (failover) vs 0.18 (restart) steps/s at p = 0.01 for
BLOOM-7.1B. Each figure is printed as a ratio to the failure-free run of the same mode."""

from __future__ import annotations

import argparse
import json
import random
import signal
import tempfile
import time
from pathlib import Path

import httpx

from corolla.local import LocalSwarm as Swarm  # the harness of corolla up and the e2e tests
from shared.models.loader import load_config, num_layers
from shared.models.resolve import resolve_model, served_name
from shared.records import even_spans


class Chaos:
    """Kills the busy server of a random span with probability p per step, and starts a new one."""

    def __init__(self, swarm: Swarm, spans: list[str], p: float, rng: random.Random):
        self.swarm, self.spans, self.p, self.rng = swarm, spans, p, rng
        self.kills = 0

    def maybe_fail(self) -> None:
        if self.rng.random() >= self.p:
            return
        span = self.rng.choice(self.spans)
        try:
            victim = self.swarm.busy(span)
        except LookupError:
            return
        victim.send_signal(signal.SIGKILL)
        self.kills += 1
        self.swarm.add_blockserver(span, nice=True)


def generate(swarm: Swarm, tokens: int, chaos: Chaos) -> bool:
    """One streamed greedy generation; True if it completed, False if it ended with an error."""
    body = {"model": swarm.model_name, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
            "stream": True, "logit_bias": {"2": -100}}
    received = 0
    with httpx.stream("POST", f"{swarm.url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return False
            if event["choices"] and event["choices"][0]["finish_reason"] is None:
                received += 1
                chaos.maybe_fail()
    return received > 0


def run_mode(model: str, name: str, spans: list[str], replicas: int, failover: bool, probabilities: list[float],
             tokens: int, budget_s: float, seed: int) -> dict[float, tuple[float, int, bool]]:
    """steps/s, kills and completion for each p, in one swarm."""
    gateway_args = ["--failover-timeout", "120", "--step-timeout", "10", "--ban", "600"]
    if not failover:
        gateway_args.append("--no-failover")
    log_dir = Path(tempfile.mkdtemp(prefix="corolla-failover-"))
    swarm = Swarm(model, log_dir, gateway_args=gateway_args, model_name=name,
                  blockserver_args=["--dtype", "bfloat16", "--num-threads", "1"])
    results = {}
    try:
        swarm.start([s for s in spans for _ in range(replicas)], timeout_s=600)
        generate(swarm, 8, Chaos(swarm, spans, 0.0, random.Random(0)))  # warm-up
        for p in probabilities:
            chaos = Chaos(swarm, spans, p, random.Random(seed))
            started = time.perf_counter()
            done = False
            while not done and time.perf_counter() - started < budget_s:
                done = generate(swarm, tokens, chaos)  # restart mode: start over after a failure
            results[p] = (tokens / (time.perf_counter() - started), chaos.kills, done)
            # let replacements finish loading before the next run
            swarm.wait_registered(len(spans) * replicas, timeout_s=300)
    finally:
        swarm.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--probabilities", type=float, nargs="+", default=[0.0, 0.01, 0.05])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--restart-budget", type=float, default=180.0,
                        help="seconds a restart-from-scratch run may take before it is reported as unfinished")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    name = served_name(args.model, model_dir)
    spans = [str(s) for s in even_spans(num_layers(load_config(model_dir)), 3)]
    reference = str(model_dir) if Path(args.model).is_dir() else args.model
    print(f"greedy generation of {args.tokens} tokens of {name}, bfloat16, spans {' '.join(spans)}, "
          f"{args.replicas} servers per span, CPU")
    table = {}
    for failover in (True, False):
        table[failover] = run_mode(reference, name, spans, args.replicas, failover, args.probabilities, args.tokens,
                                   float("inf") if failover else args.restart_budget, args.seed)
    print(f"{'p(failure)/step':>16} {'mode':>10} {'steps/s':>9} {'vs p=0':>7} {'kills':>6}")
    for p in args.probabilities:
        for failover, label in ((True, "failover"), (False, "restart")):
            sps, kills, done = table[failover][p]
            base = table[failover][args.probabilities[0]][0]
            shown = f"{sps:9.2f}" if done else f"<{sps:8.2f}"
            print(f"{p:16.2f} {label:>10} {shown} {sps / base:7.2f} {kills:6d}" + ("" if done else
                  f"  (unfinished after {args.restart_budget:.0f}s)"))


if __name__ == "__main__":
    main()
