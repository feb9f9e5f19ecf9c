"""What the benchmarks share: the 271M-parameter yardstick model and a `corolla up` swarm."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

YARDSTICK = Path.home() / ".cache" / "corolla" / "bench" / "llama-271m"


def yardstick() -> Path:
    """A random Llama (hidden 1024, 16 layers, 16 heads, intermediate 2816, vocab 32000), built once."""
    if not (YARDSTICK / "config.json").is_file():
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                             intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        print(f"built the yardstick: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
        model.save_pretrained(YARDSTICK)
    return YARDSTICK


def model_reference(name: str) -> tuple[Path, str]:
    """(directory, what to pass as --model) for 'smollm2', 'llama-271m' or a directory."""
    from shared.models.resolve import resolve_model

    if name == "llama-271m":
        return yardstick(), str(yardstick())
    directory = resolve_model(name)
    return directory, str(directory) if Path(name).is_dir() else name


@contextlib.contextmanager
def corolla_up(model: str, servers: int, dtype: str, port: int, threads: int | None = None,
               extra: list[str] = ()) -> Iterator[str]:
    """`corolla up` in a child process; yields the gateway URL once the swarm is ready."""
    log = tempfile.NamedTemporaryFile("w+", prefix="corolla-bench-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "corolla", "up", "--model", model, "--servers", str(servers),
               "--port", str(port), "--dtype", dtype, *extra]
    if threads:
        command += ["--num-threads", str(threads)]
    # output to a file, not a pipe: a pipe nobody reads would block the swarm's processes
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        while "corolla: ready" not in Path(log.name).read_text():
            if process.poll() is not None:
                raise RuntimeError(f"corolla up exited; see {log.name}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)  # corolla up stops its children before it exits


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
