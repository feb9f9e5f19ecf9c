"""`corolla blockserver`: load a span of a model and serve it to the gateways."""

from __future__ import annotations

import argparse
import socket
from urllib.parse import urlparse

from blockserver.app import create_app
from blockserver.settings import BlockserverSettings
from shared.flags import add_flags, settings_from_args
from shared.serving import serve

DESCRIPTION = ("Serve layers of MODEL over WebSocket sessions (START:END with --blocks, or chosen from the "
               "swarm and moved when the swarm would be faster), and heartbeat to every --gateway.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags left out fall back to COROLLA_BLOCKSERVER_* environment variables, then the defaults."""
    add_flags(parser, BlockserverSettings)


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
    settings = settings_from_args(BlockserverSettings, args)
    # Bind first, so that port 0 becomes a real port before the server announces itself.
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: announce the address that reaches the gateway
        host = _address_towards(settings.gateways[0]) if settings.gateways else "127.0.0.1"
    scheme = "https" if settings.ssl_certfile else "http"
    url = (settings.public_url or f"{scheme}://{host}:{port}").rstrip("/")
    print(f"blockserver listening on {settings.host}:{port}, announced as {url}", flush=True)
    serve(create_app(settings, url), "blockserver", sock=sock, ws_max_size=settings.max_frame_bytes, lifespan="on",
          max_connections=settings.max_connections, ssl_certfile=settings.ssl_certfile,
          ssl_keyfile=settings.ssl_keyfile)
    return 0
