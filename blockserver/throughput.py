"""How fast this server is: measured once per model, device and dtype on a random layer built from
the config, and cached (PETALS' throughput.py, without its network speed test)."""

from __future__ import annotations

import fcntl
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shared.models.base import build_skeleton, resolve_dtype
from shared.models.loader import family_for, load_config

log = logging.getLogger(__name__)

DEFAULT_NETWORK_BITS_S = 100e6  # assumed link speed: no speed test on a home lab's LAN


@dataclass
class Throughput:
    inference_rps: float  # decode tokens/s through one layer (batch 1)
    forward_rps: float  # prefill tokens/s through one layer (128 tokens at once)
    network_rps: float  # hidden states/s the network carries

    def announced(self, num_blocks: int) -> float:
        """What the server announces: a request enters its span half-way on average (PETALS #314)."""
        return min(self.forward_rps / ((num_blocks + 1) / 2), self.network_rps)


def measure(model_dir: Path, device: str, dtype: str, cache_file: Path) -> Throughput:
    """Cached by model, device and dtype; measured on the calling (compute) thread otherwise."""
    config = load_config(model_dir)
    key = f"{Path(model_dir).resolve()}|{device}|{resolve_dtype(dtype, config)}"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        if key in cached:
            return Throughput(**cached[key])
        result = _measure(config, device, resolve_dtype(dtype, config))
        cached[key] = asdict(result)
        cache_file.write_text(json.dumps(cached, indent=1))
    log.info("measured throughput of %s: %s", key, result)
    return result


@torch.inference_mode()
def _measure(config, device: str, dtype: torch.dtype) -> Throughput:
    from shared.models.base import LoadedSpan
    from shared.models.cache import SpanCache

    family = family_for(config)
    skeleton = build_skeleton(config)
    layer = skeleton.get_submodule(family.layers_path)[0]
    layer.to_empty(device=device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.to(dtype)
    span = LoadedSpan(family, skeleton.config, 0, 1, torch.nn.ModuleList([layer]),
                      family.rotary(skeleton, skeleton.config, device), torch.device(device), dtype, 0)
    hidden = config.hidden_size

    def rate(tokens: int, steps: int) -> float:
        cache = SpanCache(1, tokens * (steps + 1), device)
        span.step(torch.randn(1, tokens, hidden), cache)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            span.step(torch.randn(1, tokens, hidden), cache)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return tokens * steps / (time.perf_counter() - started)

    return Throughput(inference_rps=rate(1, 20), forward_rps=rate(128, 3),
                      network_rps=DEFAULT_NETWORK_BITS_S / (hidden * 16))
