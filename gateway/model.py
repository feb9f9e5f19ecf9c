"""The gateway's part of the model: tokenizer, embeddings, final norm and LM head, and the one
compute thread that runs them (the event loop only does I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gateway.sampling import SamplingParams, choose_tokens
from shared.compute import ComputeThread
from shared.models.base import ModelEnds
from shared.models.loader import ModelFacts, eos_ids, load_ends, load_facts, load_tokenizer


@dataclass
class GatewayModel:
    name: str  # the API's model id
    facts: ModelFacts
    ends: ModelEnds
    tokenizer: object | None  # a transformers tokenizer, or None (prompts must then be token ids)
    eos_ids: frozenset[int]
    pad_id: int
    compute: ComputeThread

    @classmethod
    def load(cls, name: str, directory, dtype: str, compute: ComputeThread) -> GatewayModel:
        """Runs on `compute`, the thread that will run the model."""
        facts = load_facts(directory)
        tokenizer = load_tokenizer(directory)
        eos = eos_ids(directory, facts.config, tokenizer)
        pad = getattr(facts.config, "pad_token_id", None)
        if pad is None:
            pad = min(eos, default=0)
        return cls(name=name, facts=facts, ends=load_ends(directory, "cpu", dtype), tokenizer=tokenizer,
                   eos_ids=eos, pad_id=int(pad), compute=compute)

    @property
    def num_layers(self) -> int:
        return self.facts.num_layers

    @property
    def context_length(self) -> int:
        return self.facts.context_length

    @property
    def vocab_size(self) -> int:
        return self.facts.vocab_size

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt string (special tokens added as the model's tokenizer does)."""
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]

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
