"""`corolla up`: a gateway and N blockservers on this machine, as child processes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from corolla.local import LocalSwarm
from shared.codec import WIRE_CODECS
from shared.dtypes import DTYPE_CHOICES
from shared.models.loader import load_config, num_layers
from shared.models.quant import QUANT_MODES
from shared.models.resolve import resolve_model, served_name
from shared.records import even_spans

DESCRIPTION = """\
Start a gateway and N blockservers on this machine (the model's layers split evenly between
them), wait until every layer is served, print how to use it, and stop everything on Ctrl-C.
Without --model it serves SmolLM2-135M-Instruct, offline."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory, hub id, or 'smollm2' (the default)")
    parser.add_argument("--servers", type=int, default=3, help="number of blockservers (default 3)")
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="compute dtype (default auto: bfloat16 on GPUs and on CPUs with native bfloat16, "
                             "else float32)")
    parser.add_argument("--device", default="cpu", help="blockservers' torch device: cpu, cuda, cuda:1 … (default cpu; "
                                                       "the gateway's embeddings and LM head stay on the CPU)")
    parser.add_argument("--quant", default="none", choices=QUANT_MODES,
                        help="blockservers' weight quantization (default none; see `corolla blockserver --help`)")
    parser.add_argument("--wire-codec", default="raw", choices=WIRE_CODECS,
                        help="how hidden states cross the network (default raw; see `corolla gateway --help`)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads of each process (default: the cores divided among the blockservers)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run decode steps eagerly: start in seconds instead of a minute or two, decode about "
                             "3x slower (default: the blockservers and the gateway compile them at start)")
    parser.add_argument("--api-key", default=None, help="require this API key at the gateway")
    parser.add_argument("--cache-dir", default=None, help="where converted models are kept (default ~/.cache/corolla)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the swarm (default 600)")


def run(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model, args.cache_dir)  # converts the default model once, with progress
    name = served_name(args.model, model_dir)
    spans = even_spans(num_layers(load_config(model_dir)), args.servers)
    threads = args.num_threads or max(1, (os.cpu_count() or 1) // args.servers)
    common = ["--num-threads", str(threads)] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    common += [] if args.compile else ["--no-compile"]
    gateway_args = common + (["--dtype", args.dtype] if args.dtype != "auto" else [])
    gateway_args += ["--api-key", args.api_key] if args.api_key else []
    gateway_args += ["--wire-codec", args.wire_codec] if args.wire_codec != "raw" else []
    swarm = LocalSwarm(args.model or "smollm2", gateway_args=gateway_args,
                       blockserver_args=common + ["--dtype", args.dtype, "--quant", args.quant, "--device", args.device],
                       model_name=name,
                       host=args.host,
                       port=args.port)
    stop = _catch_signals()
    try:
        swarm.start_gateway()
        for span in spans:
            swarm.add_blockserver(str(span))
        print(f"corolla: starting a gateway and {len(spans)} blockservers for {name} "
              f"(layers {' '.join(str(s) for s in spans)})", flush=True)
        try:
            swarm.wait_healthy(args.ready_timeout, progress=lambda s: print(f"corolla: waiting: {s}", flush=True))
        except (RuntimeError, TimeoutError) as exc:
            if not stop:
                print(f"corolla: {exc}", file=sys.stderr)
            return 1
        print(_usage(swarm.url, name, args.api_key), flush=True)
        while not stop:
            if any(p.poll() is not None for p in swarm.processes()):
                print("corolla: a process of the swarm exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        swarm.stop()
        print("corolla: stopped", flush=True)


def _catch_signals() -> list[int]:
    """Ctrl-C and SIGTERM set a flag instead of raising, so that stopping prints no traceback.
    Installed explicitly: a shell without job control starts background commands with SIGINT
    ignored, and Python would then never hear it."""
    stop: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: stop.append(signum))
    return stop


def _usage(url: str, name: str, api_key: str | None) -> str:
    key = api_key or "none"
    return f"""
corolla: ready. OpenAI-compatible API at {url}/v1  (model "{name}")

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -H 'Authorization: Bearer {key}' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 30}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="{key}"); \\
print(c.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)'

Press Ctrl-C to stop the swarm.
"""
