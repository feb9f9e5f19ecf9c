"""`corolla blockserver`: load a span of a model and serve it to the gateways."""

from __future__ import annotations

import argparse
import socket
from urllib.parse import urlparse

import uvicorn

from blockserver.app import create_app
from blockserver.settings import BlockserverSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags left out fall back to the settings' defaults and COROLLA_* environment variables."""
    parser.add_argument("--model",
                        help="model directory, hub id, or 'smollm2' (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model-name", help="name announced to gateways (default: derived from --model)")
    parser.add_argument("--blocks", metavar="START:END",
                        help="layers to serve, half-open, e.g. 0:10 (default: choose them from the swarm, and "
                             "move when the swarm would be faster)")
    parser.add_argument("--num-blocks", type=int,
                        help="without --blocks: how many layers to serve (default: as many as fit in --max-memory)")
    parser.add_argument("--max-memory", type=float, dest="max_memory_gib", metavar="GIB",
                        help="memory for weights and KV cache, to size --num-blocks (default: half the free memory)")
    parser.add_argument("--throughput", type=float,
                        help="tokens/s to announce (default: measured once per model, device and dtype, then cached)")
    parser.add_argument("--balance-period", type=float, dest="balance_period_s", metavar="SECONDS",
                        help="mean seconds between rebalancing checks (default 60)")
    parser.add_argument("--balance-quality", type=float,
                        help="move when the swarm's weakest layer would grow by more than 1/this (default 0.75)")
    parser.add_argument("--join-delay", type=float, dest="join_delay_s", metavar="SECONDS",
                        help="wait up to this long (at random) before choosing a span (default 2)")
    parser.add_argument("--swarm-secret", help="the swarm's join secret, required by gateways started with one")
    parser.add_argument("--gateway", action="append", dest="gateways", metavar="URL",
                        help="a gateway to heartbeat to (repeat for several), e.g. http://10.0.0.2:8000")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="port to listen on (default 0: a free port)")
    parser.add_argument("--public-url",
                        help="address gateways should connect to, when it differs from where this server "
                             "listens (NAT, containers), e.g. http://myhost:31330")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (default auto: the checkpoint's)")
    parser.add_argument("--device", help="torch device: cpu, cuda, cuda:1 … (default cpu)")
    parser.add_argument("--cache-tokens", type=int,
                        help="KV-cache budget in tokens (batch × length summed over open sessions; default 16384)")
    parser.add_argument("--prefill-chunk", type=int, dest="prefill_chunk_tokens", metavar="TOKENS",
                        help="run longer steps (prompts, failover replays) in chunks of this many tokens (default 512)")
    parser.add_argument("--heartbeat-interval", type=float, dest="heartbeat_interval_s",
                        metavar="SECONDS", help="seconds between heartbeats; records expire after 3 (default 2)")
    parser.add_argument("--idle-timeout", type=float, dest="idle_timeout_s", metavar="SECONDS",
                        help="free a session after this long without a message (default 300)")
    parser.add_argument("--num-threads", type=int, help="torch threads for compute (default: all cores)")
    parser.add_argument("--cache-dir", help="where converted models are kept (default ~/.cache/corolla)")


def _address_towards(url: str) -> str:
    """This machine's address on the route to `url` (a UDP connect sends nothing)."""
    target = urlparse(url)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target.hostname, target.port or 80))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in BlockserverSettings.model_fields and v is not None}
    settings = BlockserverSettings(**fields)
    # Bind first, so that port 0 becomes a real port before the server announces itself.
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: announce the address that reaches the gateway
        host = _address_towards(settings.gateways[0]) if settings.gateways else "127.0.0.1"
    url = (settings.public_url or f"http://{host}:{port}").rstrip("/")
    print(f"blockserver listening on {settings.host}:{port}, announced as {url}", flush=True)
    app = create_app(settings, url)
    config = uvicorn.Config(app, log_level="warning", ws_per_message_deflate=False,
                            ws_max_size=settings.max_frame_bytes, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0
