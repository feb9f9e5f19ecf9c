"""How fast this server is: measured once per model, device, dtype and quantization on a random layer built from
the config, and cached (PETALS' throughput.py, without its network speed test). Decode speed is
measured alone and with 16 sessions batched in one tick, since that is how a busy server runs."""

from __future__ import annotations

import fcntl
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shared.dtypes import resolve_dtype
from shared.models.cache import SpanCache
from shared.models.loader import load_config, random_layer

log = logging.getLogger(__name__)

DEFAULT_NETWORK_BITS_S = 100e6  # assumed link speed: no speed test on a home lab's LAN


BATCH = 16  # sessions decoding together in the batched measurement


@dataclass
class Throughput:
    decode_tokens_per_s: float  # decode tokens/s through one layer, one session alone
    batch_decode_tokens_per_s: float  # decode tokens/s through one layer, BATCH sessions in each tick
    prefill_tokens_per_s: float  # prefill tokens/s through one layer (128 tokens at once)
    network_tokens_per_s: float  # hidden states/s the network carries

    def announced(self, num_layers: int) -> float:
        """What the server announces for span choice: the tokens/s it sustains decoding many
        sessions at once through its span; a request enters the span half-way on average (PETALS
        #314)."""
        return min(self.batch_decode_tokens_per_s / ((num_layers + 1) / 2), self.network_tokens_per_s)


def measure(model_dir: Path, device: str, dtype: str, cache_file: Path, quant: str = "none") -> Throughput:
    """Cached by model, device, dtype and quantization; measured on the calling (compute) thread otherwise."""
    config = load_config(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    key = f"{Path(model_dir).resolve()}|{device}|{torch_dtype}|{quant}|v3"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        if key in cached:
            return Throughput(**cached[key])
        result = _measure(config, device, torch_dtype, quant)
        cached[key] = asdict(result)
        cache_file.write_text(json.dumps(cached, indent=1))
    log.info("measured throughput of %s: %s", key, result)
    return result


@torch.inference_mode()
def _measure(config, device: str, dtype: torch.dtype, quant: str = "none") -> Throughput:
    span = random_layer(config, device, dtype, quant)
    hidden = config.hidden_size

    def rate(tokens: int, steps: int) -> float:
        cache = SpanCache(1, tokens * (steps + 1), device)
        span.step(torch.randn(1, tokens, hidden), cache)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            span.step(torch.randn(1, tokens, hidden), cache)
        _sync(device)
        return tokens * steps / (time.perf_counter() - started)

    def batched_rate(steps: int) -> float:
        caches = [SpanCache(1, 64 + steps + 1, device) for _ in range(BATCH)]
        for cache in caches:  # sessions holding 64 tokens each
            span.step(torch.randn(1, 64, hidden), cache)
        span.step_batch([torch.randn(1, 1, hidden) for _ in caches], caches, [None] * BATCH)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            span.step_batch([torch.randn(1, 1, hidden) for _ in caches], caches, [None] * BATCH)
        _sync(device)
        return BATCH * steps / (time.perf_counter() - started)

    return Throughput(decode_tokens_per_s=rate(1, 20), batch_decode_tokens_per_s=batched_rate(10),
                      prefill_tokens_per_s=rate(128, 3), network_tokens_per_s=DEFAULT_NETWORK_BITS_S / (hidden * 16))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
