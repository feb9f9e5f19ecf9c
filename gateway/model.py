"""The gateway's part of the model: tokenizer, embeddings, final norm and LM head, and the one
compute thread that runs them (the event loop only does I/O).

Concurrent generations share that thread through ticks (shared/ticks.py): every generation that
waits for its next tokens is served by one call, one LM-head product over all their rows, each
sampled with its own parameters, and the chosen tokens embedded together for their next step."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gateway.adapters import PromptAdapter, load_adapter
from gateway.decode import DecodeState
from gateway.grammar import Grammars, Matcher, mask_logits
from gateway.sampling import SamplingParams, choose_tokens, token_logprobs
from shared.compute import ComputeThread
from shared.errors import BadRequest
from shared.models.base import ModelEnds
from shared.models.loader import ModelFacts, eos_ids, load_ends, load_facts, load_tokenizer
from shared.models.rows import DECODE, row_plan
from shared.ticks import Linger, Ticker

log = logging.getLogger(__name__)


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k")  # what a generation_config.json may set for a request


def sampling_defaults(directory: Path, source: str) -> dict[str, float]:
    """The sampling parameters a model's authors set in its generation_config.json (only those
    written there, not transformers' own defaults), as vLLM applies them; {} for source 'none'."""
    if source == "none":
        return {}
    folder = Path(directory) if source == "auto" else Path(source)
    path = folder / "generation_config.json"
    if not path.is_file():
        if source != "auto":
            raise BadRequest(f"--generation-config {source}: no generation_config.json there")
        return {}
    written = json.loads(path.read_text())
    found = {k: float(written[k]) for k in SAMPLING_DEFAULTS if isinstance(written.get(k), int | float)}
    if found:
        log.info("sampling defaults from %s: %s (--generation-config none to use OpenAI's)", path, found)
    return found


@dataclass(eq=False)
class Sample:
    """Choose each row's next token from its last hidden state [rows, 1, hidden], and embed it."""

    hidden: torch.Tensor
    state: DecodeState  # the generation's ids (the chosen tokens are written into it) and penalty counts
    params: SamplingParams
    generator: torch.Generator | None
    logprobs: int | None = None  # also score the chosen tokens, with this many alternatives
    matchers: list[Matcher | None] | None = None  # rows whose output a grammar constrains


@dataclass
class Scores:
    """Log-probabilities of chosen tokens [rows], and the most likely alternatives [rows][top], as
    plain lists (made on the compute thread: reading them on the event loop costs no torch)."""

    chosen: list
    top_values: list
    top_ids: list

    @classmethod
    def of(cls, chosen: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor) -> Scores:
        return cls(chosen.tolist(), top_values.tolist(), top_ids.tolist())

    def at(self, *where: int) -> tuple[float, list[tuple[int, float]]]:
        """The chosen token's log-probability and the alternatives at `where` (row, or row and position)."""
        chosen, values, ids = self.chosen, self.top_values, self.top_ids
        for i in where:
            chosen, values, ids = chosen[i], values[i], ids[i]
        return chosen, list(zip(ids, values))


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
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # from generation_config.json
    batch_invariant: bool = True  # the LM head runs rows in fixed tiles (shared/models/rows.py)
    grammars: Grammars = field(init=False, repr=False)  # structured output against this tokenizer
    max_token_chars: int = field(init=False, repr=False)  # the longest vocabulary entry, in characters
    ticker: Ticker = field(init=False, repr=False)
    linger: Linger = field(init=False, repr=False)
    eos_tensor: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.eos_tensor = torch.tensor(sorted(self.eos_ids), dtype=torch.long)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        # no token decodes to more characters than its vocabulary entry has (byte-level BPE spells a
        # byte as one character, SentencePiece a space as one): the bound of gateway.limits' cheap check
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        self.max_token_chars = max((len(t) for t in vocab), default=1)
        self.linger = Linger(self.linger_s)
        self.ticker = Ticker(self.compute, lambda queue: list(queue), self._run_tick, "ends",
                             lambda queue: self.linger([i for i in queue if isinstance(i, Sample)]))

    @classmethod
    def load(cls, name: str, directory, dtype: str, compute: ComputeThread, linger_s: float = 0.0,
             adapters: list[str] = (), generation_config: str = "auto") -> GatewayModel:
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
        model = cls(name=name, facts=facts, ends=load_ends(directory, "cpu", dtype), tokenizer=tokenizer,
                    eos_ids=eos, pad_id=int(pad), compute=compute, linger_s=linger_s, adapters=loaded,
                    sampling_defaults=sampling_defaults(directory, generation_config))
        model.grammars.prepare()
        return model

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

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]

    async def run(self, fn, *args):
        return await self.compute.run(fn, *args)

    async def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[rows, tokens] ids -> [rows, tokens, hidden]."""
        return await self.ticker.submit(Embed(ids))

    async def sample(self, hidden: torch.Tensor, state: DecodeState, params: SamplingParams,
                     generator: torch.Generator | None, client: object = None,
                     logprobs: int | None = None,
                     matchers: list[Matcher | None] | None = None) -> tuple[list[int], torch.Tensor, Scores | None]:
        """hidden: [rows, 1, hidden] (the last position) -> the next token of each row (also
        appended to `state`), their embeddings [rows, 1, hidden] and, when `logprobs` is given,
        their Scores; batched with every other generation waiting for its tokens. `client` names
        the generation, so that ticks may wait for its peers (Linger). `matchers` constrain rows to
        their grammars (and advance)."""
        item = Sample(hidden, state, params, generator, logprobs, matchers)
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
            hidden = torch.cat([s.hidden for s in samples])
            with row_plan([(hidden.shape[0] * hidden.shape[1], DECODE)] if self.batch_invariant else None):
                logits = self.ends.logits(hidden)[:, -1]
            rows = [s.hidden.shape[0] for s in samples]
            chosen = []
            for s, part in zip(samples, logits.split(rows)):
                try:
                    allowed = part if s.matchers is None else mask_logits(part, s.matchers, self.grammars.eos_ids)
                    tokens = choose_tokens(allowed, s.state.counts, s.params, s.generator)
                    for matcher, token in zip(s.matchers or (), tokens.tolist()):
                        if matcher is not None:
                            matcher.consume(token)
                    scores = None if s.logprobs is None else Scores.of(*token_logprobs(part, tokens, s.logprobs))
                    s.state.take(tokens, self.eos_tensor)
                    chosen.append((tokens, scores))
                except Exception as exc:  # one request's sampling error is its own
                    outcomes[id(s)] = exc
            good = [s for s in samples if id(s) not in outcomes]
            if good:
                ids = torch.cat([tokens for tokens, _ in chosen])[:, None]
                embedded = self.ends.embed_tokens(ids).split([s.hidden.shape[0] for s in good])
                for s, (tokens, scores), emb in zip(good, chosen, embedded):
                    outcomes[id(s)] = (tokens.tolist(), emb, scores)
        for item in items:
            if isinstance(item, Embed):
                try:
                    outcomes[id(item)] = self.ends.embed_tokens(item.ids)
                except Exception as exc:
                    outcomes[id(item)] = exc
        return [outcomes[id(i)] for i in items]

    async def score(self, hidden: torch.Tensor, ids: torch.Tensor, top: int) -> Scores:
        """Log-probabilities of each token of `ids` [rows, T] after the one before it, from the
        last layer's `hidden` [rows, T, hidden] (one LM-head product per row, on the compute
        thread): Scores over [rows, T - 1] positions."""
        def run() -> Scores:
            parts = []
            for row in range(ids.shape[0]):
                logits = self.ends.logits(hidden[row:row + 1, :-1])[0]
                parts.append(token_logprobs(logits, ids[row, 1:], top))
            return Scores.of(*(torch.stack(p) for p in zip(*parts)))
        return await self.run(run)

    def token_text(self, token: int) -> str:
        """One token as text (its own decoding, special tokens included, as OpenAI reports tokens)."""
        if self.tokenizer is None:
            return f"<{token}>"
        return self.tokenizer.decode([token])

    def decode(self, ids: list[int], special: bool = False) -> str:
        """Text of `ids`; special tokens (BOS, EOS, ...) dropped unless `special`."""
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=not special)

    async def close(self) -> None:
        await self.ticker.close()
        self.compute.shutdown()
