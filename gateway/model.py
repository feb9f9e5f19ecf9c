"""The gateway's part of the model: tokenizer, embeddings, final norm and LM head, and the one
compute thread that runs them (the event loop only does I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gateway.sampling import SamplingParams, choose_tokens
from shared.compute import ComputeThread
from shared.models.base import ModelEnds
from shared.models.loader import load_config, load_ends, load_tokenizer, num_layers


@dataclass
class GatewayModel:
    name: str
    directory: Path
    ends: ModelEnds
    tokenizer: object | None
    num_layers: int
    context_length: int
    vocab_size: int
    eos_ids: frozenset[int]
    pad_id: int
    compute: ComputeThread

    @classmethod
    def load(cls, name: str, directory: Path, dtype: str, compute: ComputeThread) -> GatewayModel:
        """Runs on `compute`, the thread that will run the model."""
        config = load_config(directory)
        tokenizer = _tokenizer(directory)
        eos = _eos_ids(directory, config, tokenizer)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = next(iter(sorted(eos)), 0)
        return cls(name=name, directory=directory, ends=load_ends(directory, "cpu", dtype), tokenizer=tokenizer,
                   num_layers=num_layers(config), context_length=config.max_position_embeddings,
                   vocab_size=config.vocab_size, eos_ids=frozenset(eos), pad_id=int(pad), compute=compute)

    async def run(self, fn, *args):
        return await self.compute.run(fn, *args)

    async def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return await self.run(self.ends.embed_tokens, ids)

    async def next_tokens(self, hidden: torch.Tensor, counts: torch.Tensor, params: SamplingParams,
                          generator: torch.Generator | None) -> torch.Tensor:
        """hidden: [batch, 1, hidden] (the last position) -> [batch] token ids."""
        return await self.run(_next_tokens, self.ends, hidden, counts, params, generator)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        self.compute.shutdown()


def _next_tokens(ends: ModelEnds, hidden, counts, params, generator):
    logits = ends.logits(hidden)[:, -1]
    return choose_tokens(logits, counts, params, generator)


def _tokenizer(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return load_tokenizer(directory)


def _eos_ids(directory: Path, config, tokenizer) -> set[int]:
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        value = GenerationConfig.from_pretrained(directory).eos_token_id
    except OSError:
        value = getattr(config, "eos_token_id", None)
    if value is not None:
        ids.update(value if isinstance(value, list) else [value])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
