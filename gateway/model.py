"""The gateway's part of the model: tokenizer, embeddings, final norm and LM head, and the one
compute thread that runs them (the event loop only does I/O).

Concurrent generations share that thread through ticks (shared/ticks.py): every generation that
waits for its next tokens is served by one call, one LM-head product over all their rows, each
sampled with its own parameters, and the chosen tokens embedded together for their next step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gateway.adapters import PromptAdapter, load_adapter
from gateway.sampling import SamplingParams, choose_tokens
from shared.compute import ComputeThread
from shared.errors import BadRequest
from shared.models.base import ModelEnds
from shared.models.loader import ModelFacts, eos_ids, load_ends, load_facts, load_tokenizer
from shared.ticks import Linger, Ticker


@dataclass(eq=False)
class Sample:
    """Choose each row's next token from its last hidden state [rows, 1, hidden], and embed it."""

    hidden: torch.Tensor
    counts: torch.Tensor  # [rows, vocab] tokens generated so far (penalties)
    params: SamplingParams
    generator: torch.Generator | None


@dataclass(eq=False)
class Embed:
    ids: torch.Tensor  # [rows, tokens]


@dataclass
class GatewayModel:
    name: str  # the API's model id
    facts: ModelFacts
    ends: ModelEnds
    tokenizer: object | None  # a transformers tokenizer, or None (prompts must then be token ids)
    eos_ids: frozenset[int]
    pad_id: int
    compute: ComputeThread
    linger_s: float = 0.0
    adapters: dict[str, PromptAdapter] = field(default_factory=dict)  # tuned prompts served as model ids
    ticker: Ticker = field(init=False, repr=False)
    linger: Linger = field(init=False, repr=False)

    def __post_init__(self):
        self.linger = Linger(self.linger_s)
        self.ticker = Ticker(self.compute, lambda queue: list(queue), self._run_tick, "ends",
                             lambda queue: self.linger([i for i in queue if isinstance(i, Sample)]))

    @classmethod
    def load(cls, name: str, directory, dtype: str, compute: ComputeThread, linger_s: float = 0.0,
             adapters: list[str] = ()) -> GatewayModel:
        """Runs on `compute`, the thread that will run the model. `adapters`: NAME=PATH of tuned prompts."""
        facts = load_facts(directory)
        tokenizer = load_tokenizer(directory)
        eos = eos_ids(directory, facts.config, tokenizer)
        pad = getattr(facts.config, "pad_token_id", None)
        if pad is None:
            pad = min(eos, default=0)
        loaded = {}
        for spec in adapters:
            adapter = load_adapter(spec, facts.fingerprint, facts.num_layers, facts.hidden_size)
            if adapter.name == name or adapter.name in loaded:
                raise BadRequest(f"prompt adapter name {adapter.name!r} is already a model id here")
            loaded[adapter.name] = adapter
        return cls(name=name, facts=facts, ends=load_ends(directory, "cpu", dtype), tokenizer=tokenizer,
                   eos_ids=eos, pad_id=int(pad), compute=compute, linger_s=linger_s, adapters=loaded)

    async def prefix(self, adapter: PromptAdapter) -> torch.Tensor:
        """The adapter's soft prompt as the first layer receives it [P, hidden] (prepared like
        input embeddings: BLOOM's LayerNorm and the like)."""
        return await self.run(self.ends.prepare_inputs, adapter.soft_prompt.to(self.ends.embed.weight.dtype))

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
        """[rows, tokens] ids -> [rows, tokens, hidden]."""
        return await self.ticker.submit(Embed(ids))

    async def sample(self, hidden: torch.Tensor, counts: torch.Tensor, params: SamplingParams,
                     generator: torch.Generator | None, client: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: [rows, 1, hidden] (the last position) -> the next token ids [rows] and their
        embeddings [rows, 1, hidden], batched with every other generation waiting for its tokens.
        `client` names the generation, so that ticks may wait for its peers (Linger)."""
        item = Sample(hidden, counts, params, generator)
        self.linger.arrived(client if client is not None else item, item)
        return await self.ticker.submit(item)

    def finished(self, client: object) -> None:
        self.linger.forget(client)

    def _run_tick(self, items: list[Sample | Embed]) -> list[object]:
        """On the compute thread: one LM-head product for every Sample's rows, then each sampled
        with its own parameters, then one embedding lookup for all chosen tokens."""
        outcomes: dict[int, object] = {}
        samples = [i for i in items if isinstance(i, Sample)]
        if samples:
            logits = self.ends.logits(torch.cat([s.hidden for s in samples]))[:, -1]
            rows = [s.hidden.shape[0] for s in samples]
            chosen = []
            for s, part in zip(samples, logits.split(rows)):
                try:
                    tokens = choose_tokens(part, s.counts, s.params, s.generator)
                    chosen.append(tokens)
                except Exception as exc:  # one request's sampling error is its own
                    outcomes[id(s)] = exc
            good = [s for s in samples if id(s) not in outcomes]
            if good:
                embedded = self.ends.embed_tokens(torch.cat(chosen)[:, None]).split([s.hidden.shape[0] for s in good])
                for s, tokens, emb in zip(good, chosen, embedded):
                    outcomes[id(s)] = (tokens, emb)
        for item in items:
            if isinstance(item, Embed):
                try:
                    outcomes[id(item)] = self.ends.embed_tokens(item.ids)
                except Exception as exc:
                    outcomes[id(item)] = exc
        return [outcomes[id(i)] for i in items]

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def close(self) -> None:
        await self.ticker.close()
        self.compute.shutdown()
