"""`corolla status`: the swarm as a gateway sees it, printed in a terminal."""

from __future__ import annotations

import argparse
import os

import httpx

DESCRIPTION = ("Print the servers, spans, speed, free cache and per-layer coverage of the swarm behind a "
               "gateway (its /v1/swarm).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default="http://127.0.0.1:8000", help="gateway URL (default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=os.environ.get("COROLLA_GATEWAY_API_KEY"),
                        help="the gateway's API key, when it has one (default: $COROLLA_GATEWAY_API_KEY)")


def render(snap: dict) -> str:
    n = snap["num_layers"]
    width = max([len(s["server_id"]) for s in snap["servers"]] + [6])
    lines = [f"{snap['model']}: {n} layers, {len(snap['servers'])} servers, "
             + ("every layer served" if not snap["missing_layers"] else f"MISSING layers {snap['missing_layers']}"), ""]
    lines.append(f"{'server':{width}}  {'layers':{n}}  span     state    weights        tok/s  sessions  free cache     RTT")
    for s in snap["servers"]:
        bar = "".join("█" if s["start"] <= i < s["end"] else "·" for i in range(n))
        rtt = "–" if s["rtt_ms"] is None else f"{s['rtt_ms']:.1f} ms"
        weights = s["dtype"] if s.get("quant", "none") == "none" else f"{s['dtype']} {s['quant']}"
        lines.append(f"{s['server_id']:{width}}  {bar}  {s['start']:>3}:{s['end']:<3}  {s['state']:8} {weights:14} "
                     f"{s['throughput']:6.1f}  {s['sessions']:8d}  {s['cache_tokens_left']:10d}  {rtt:>7}")
    cover = "".join(str(c) if c < 10 else "+" for c in snap["coverage"])
    lines.append(f"{'per layer':{width}}  {cover}")
    f = snap["failover"]
    lines.append(f"\nfailovers: {f['failures']} failures, {f['recoveries']} recovered, {f['given_up']} given up")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    url = args.gateway.rstrip("/")
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        response = httpx.get(f"{url}/v1/swarm", timeout=10, headers=headers)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"corolla: cannot read {url}/v1/swarm: {exc}")
        return 1
    print(render(response.json()))
    return 0
