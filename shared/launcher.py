"""`corolla up`: a gateway and N blockservers on this machine, as child processes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

import httpx

from shared.models.loader import load_config, num_layers
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
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="blockservers' compute dtype (default auto: the checkpoint's)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads of each process (default: the cores divided among the blockservers)")
    parser.add_argument("--api-key", default=None, help="require this API key at the gateway")
    parser.add_argument("--cache-dir", default=None, help="where converted models are kept (default ~/.cache/corolla)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the swarm (default 600)")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # health polls are not news
    model_dir = resolve_model(args.model, args.cache_dir)  # converts the default model once, with progress
    name = served_name(args.model, model_dir)
    spans = even_spans(num_layers(load_config(model_dir)), args.servers)
    reference = args.model or "smollm2"
    common = ["--model", reference, "--model-name", name] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    gateway_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    threads = args.num_threads or max(1, (os.cpu_count() or 1) // args.servers)
    cli = [sys.executable, "-m", "shared.cli", "--log-level", "WARNING"]
    children: list[subprocess.Popen] = []
    try:
        gateway_cmd = cli + ["gateway", *common, "--host", args.host, "--port", str(args.port),
                             "--num-threads", str(threads)]
        if args.dtype != "auto":
            gateway_cmd += ["--dtype", args.dtype]
        if args.api_key:
            gateway_cmd += ["--api-key", args.api_key]
        children.append(subprocess.Popen(gateway_cmd))
        for span in spans:
            children.append(subprocess.Popen(cli + ["blockserver", *common, "--blocks", str(span), "--gateway",
                                                    gateway_url, "--dtype", args.dtype, "--num-threads", str(threads)]))
        print(f"corolla: starting a gateway and {len(spans)} blockservers for {name} "
              f"(layers {' '.join(str(s) for s in spans)})", flush=True)
        if not _wait_ready(gateway_url, children, args.ready_timeout):
            return 1
        print(_usage(gateway_url, name, args.api_key), flush=True)
        _wait_for_signal(children)
        return 0
    finally:
        _stop(children)


def _wait_ready(url: str, children: list[subprocess.Popen], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        dead = [c for c in children if c.poll() is not None]
        if dead:
            print(f"corolla: a process exited during start-up (exit {dead[0].returncode}): {' '.join(dead[0].args[3:6])}",
                  file=sys.stderr)
            return False
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            if response.status_code == 200:
                return True
            body = response.json()
            status = f"{body.get('servers', 0)} blockservers online, missing layers {body.get('missing_layers', '?')}"
        except (httpx.HTTPError, ValueError):
            status = "gateway starting"
        if status != last:
            print(f"corolla: waiting: {status}", flush=True)
            last = status
        time.sleep(0.5)
    print(f"corolla: the swarm was not ready within {timeout_s:.0f}s", file=sys.stderr)
    return False


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


def _wait_for_signal(children: list[subprocess.Popen]) -> None:
    stop = []
    # Installed explicitly: a shell without job control starts background commands with SIGINT
    # ignored, and Python would then never raise KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(1))
    while not stop:
        if any(c.poll() is not None for c in children):
            print("corolla: a process of the swarm exited; stopping", file=sys.stderr)
            return
        time.sleep(0.2)


def _stop(children: list[subprocess.Popen]) -> None:
    # blockservers first, so that they announce `offline` to a gateway that still listens
    for group in (children[1:], children[:1]):
        for child in group:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        for child in group:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    if children:
        print("corolla: stopped", flush=True)
