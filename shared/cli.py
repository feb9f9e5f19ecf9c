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


def _verify_model(args: argparse.Namespace) -> int:
    from shared.models.resolve import resolve_model
    from shared.models.verify import verify_model

    model_dir = resolve_model(args.model, args.cache_dir)
    report = verify_model(model_dir, spans=args.spans, steps=args.steps, dtype=args.dtype,
                          prompt=args.prompt, device=args.device)
    print(report.render())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corolla", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from blockserver import __main__ as blockserver_main
    from gateway import __main__ as gateway_main
    from shared import launcher, status

    # (name, module with add_arguments/run, help, description)
    roles = [
        ("up", launcher, "start a gateway and blockservers on this machine", launcher.DESCRIPTION),
        ("gateway", gateway_main, "run the OpenAI-compatible gateway and registry",
         "Serve the OpenAI API for MODEL, drive generations through chains of blockservers, and host "
         "the registry they heartbeat to."),
        ("blockserver", blockserver_main, "serve a span of a model's layers",
         "Serve layers of MODEL over WebSocket sessions (START:END with --blocks, or chosen from the "
         "swarm and moved when the swarm would be faster), and heartbeat to every --gateway."),
        ("status", status, "print the swarm a gateway sees",
         "Print the servers, spans, speed, free cache and per-layer coverage of the swarm behind a "
         "gateway (its /v1/swarm)."),
    ]
    for name, module, help_text, description in roles:
        role = sub.add_parser(name, help=help_text, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(role)
        role.set_defaults(run=module.run)

    verify = sub.add_parser(
        "verify-model", help="run MODEL split into spans against the whole model in transformers",
        description="Split MODEL into N spans, run a prefill plus K greedy decode steps through them, "
                    "and compare every step's logits with the same model run whole by transformers. "
                    "Prints the largest logit difference and the greedy-token agreement; exits 1 "
                    "when they differ beyond tolerance (float32: 1e-3 absolute; 16-bit: 2.5% of the "
                    "largest logit).")
    verify.add_argument("model", nargs="?", default=None,
                        help="a directory with config.json and *.safetensors, a Hugging Face hub id, "
                             "or 'smollm2' (the default: SmolLM2-135M-Instruct, converted offline)")
    verify.add_argument("--spans", type=int, default=3, help="number of spans to split the layers into (default 3)")
    verify.add_argument("--steps", type=int, default=20, help="greedy decode steps after the prefill (default 20)")
    verify.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of both runs (default float32)")
    verify.add_argument("--prompt", default="The capital of France is", help="prompt to start from")
    verify.add_argument("--device", default="cpu", help="torch device (default cpu)")
    verify.add_argument("--cache-dir", default=None, help="where converted models are kept (default ~/.cache/corolla)")
    verify.set_defaults(run=_verify_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Set before torch loads OpenMP. Its workers busy-wait for a long time after each parallel
    # region by default; with a gateway and blockservers on one machine, the spinning workers of
    # the process that just finished a step steal the cores of the one that computes next
    # (measured: a 3-hop chain of a 271M Llama went from 0.64x to 0.90x of local generation).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except CorollaError as exc:
        print(f"corolla: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
