"""`corolla gateway`: the OpenAI-compatible API and the swarm's registry."""

from __future__ import annotations

import argparse

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags left out fall back to the settings' defaults and COROLLA_* environment variables."""
    parser.add_argument("--model",
                        help="model directory, hub id, or 'smollm2' (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model-name", help="model id in the API (default: derived from --model)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--api-key", help="require this key as 'Authorization: Bearer KEY'")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the gateway's embeddings and LM head (default float32)")
    parser.add_argument("--step-timeout", type=float, dest="step_timeout_s", metavar="SECONDS",
                        help="a blockserver with no reply to a step for this long has failed (default 30)")
    parser.add_argument("--failover-timeout", type=float, dest="failover_timeout_s", metavar="SECONDS",
                        help="how long to look for a replacement when a blockserver fails mid-generation (default 30)")
    parser.add_argument("--no-failover", action="store_false", dest="failover", default=None,
                        help="fail a request when a blockserver fails instead of replacing it (for comparisons)")
    parser.add_argument("--ban", type=float, dest="ban_s", metavar="SECONDS",
                        help="keep a failed blockserver out of routing this long, doubling on repeats (default 15)")
    parser.add_argument("--swarm-secret", help="require this join secret of blockservers' heartbeats")
    parser.add_argument("--ping-interval", type=float, dest="ping_interval_s", metavar="SECONDS",
                        help="how often to measure the round trip to each blockserver, for routing (default 5)")
    parser.add_argument("--num-threads", type=int, help="torch threads for the ends (default: all cores)")
    parser.add_argument("--cache-dir", help="where converted models are kept (default ~/.cache/corolla)")


def run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in GatewaySettings.model_fields and v is not None}
    settings = GatewaySettings(**fields)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", ws_per_message_deflate=False,
                timeout_graceful_shutdown=5)
    return 0
