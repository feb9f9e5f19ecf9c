"""`corolla gateway`: the OpenAI-compatible API and the swarm's registry."""

from __future__ import annotations

import argparse

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.flags import add_flags, settings_from_args
from shared.serving import serve

DESCRIPTION = ("Serve the OpenAI API for MODEL, drive generations through chains of blockservers, and host "
               "the registry they heartbeat to.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags left out fall back to COROLLA_GATEWAY_* environment variables, then the defaults."""
    add_flags(parser, GatewaySettings)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(GatewaySettings, args)
    serve(create_app(settings), "gateway", settings.host, settings.port, max_connections=settings.max_connections,
          ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
    return 0
