"""The `corolla` command: one entry point for every role (gateway, blockserver, up, tools)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shared.errors import CorollaError

DESCRIPTION = """\
Corolla runs a language model too large for one machine on a swarm of blockservers (each holding
a span of the model's layers) behind an OpenAI-compatible gateway.

  corolla up                     a gateway and blockservers on this machine (SmolLM2 by default)
  corolla gateway                the OpenAI-compatible API and the swarm's registry
  corolla blockserver --gateway URL [--blocks A:B]
                                 serve layers of the model (chosen for the swarm, or A:B)
  corolla status --gateway URL   the swarm: servers, spans, coverage
  corolla verify-model MODEL     check a model split into spans against transformers
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corolla", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from blockserver import __main__ as blockserver_main
    from corolla import status, up, verify
    from gateway import __main__ as gateway_main

    # (name, module with add_arguments/run, help, its DESCRIPTION)
    roles = [
        ("up", up, "start a gateway and blockservers on this machine"),
        ("gateway", gateway_main, "run the OpenAI-compatible gateway and registry"),
        ("blockserver", blockserver_main, "serve a span of a model's layers"),
        ("status", status, "print the swarm a gateway sees"),
        ("verify-model", verify, "run MODEL split into spans against the whole model in transformers"),
    ]
    for name, module, help_text in roles:
        role = sub.add_parser(name, help=help_text, description=module.DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(role)
        role.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Set before torch loads OpenMP. Its workers busy-wait for a long time after each parallel
    # region by default; with a gateway and blockservers on one machine, the spinning workers of
    # the process that just finished a step steal the cores of the one that computes next
    # (measured: a 3-hop chain of a 271M Llama went from 0.64x to 0.90x of local generation).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore"):  # one line per HTTP request (heartbeats, pings) is not news
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return args.run(args)
    except CorollaError as exc:
        print(f"corolla: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
