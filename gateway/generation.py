"""The generation loop (Algorithm 1 of the paper, gateway side): embed, step through the chain,
sample, stream. One async generator serves streaming and non-streaming requests alike."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from gateway.admission import Admission
from gateway.chain import ChainConfig, ChainSession, NeedsRecompute
from gateway.channel import Connect
from gateway.decode import DecodeState, Detokenizer
from gateway.model import GatewayModel
from gateway.passes import RemoteLayers
from gateway.requests import GenerationRequest
from gateway.stops import releasable
from gateway.swarm import Swarm
from shared.errors import CacheFull

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass
class TokenLogprob:
    """One token of a choice with its log-probability (None for a prompt's first token) and the
    most likely alternatives at its position (token id, log-probability)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TextDelta:
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens this text comes from (when asked)


@dataclass
class Finished:
    index: int
    reason: FinishReason
    cumulative_logprob: float = 0.0  # of every generated token (EOS included), when scored


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = TextDelta | Finished | Usage


@dataclass
class _Choice:
    index: int
    text: Detokenizer
    generated: int = 0  # tokens, EOS not included
    unsent: str = ""  # text decoded but not sent yet (it may still turn into a stop string)
    reason: FinishReason | None = None
    pending: list[TokenLogprob] = field(default_factory=list)  # scored tokens not yet sent
    cumulative: float = 0.0


class Generation:
    """One request's generation. `start()` admits it (it may queue while the swarm has no room;
    Overloaded when the queue is full or the wait runs out) and opens its chain; `events()` runs
    it. When a running generation finds no room on any server (or a failed hop's history was
    dropped), it gives its sessions back, waits at the front of the queue, and recomputes its
    whole sequence on a fresh chain, then goes on where it was (vLLM's preemption by
    recomputation): the answer is the same."""

    def __init__(self, request: GenerationRequest, model: GatewayModel, swarm: Swarm, config: ChainConfig,
                 connect: Connect, admission: Admission):
        self.request, self.model, self.swarm, self.config = request, model, swarm, config
        self.connect, self.admission = connect, admission
        self.rows = [prompt for prompt in request.prompts for _ in range(request.n)]
        params, adapter = request.params, request.adapter
        self.state = DecodeState(self.rows, model.pad_id, request.max_tokens, model.vocab_size,
                                 virtual=request.virtual_tokens,
                                 penalties=bool(params.frequency_penalty or params.presence_penalty))
        self.deep = adapter.deep_prompts if adapter is not None else None
        self.prefix: torch.Tensor | None = None  # the soft prompt as the first layer receives it
        self.max_length = self.state.capacity + request.virtual_tokens
        self.session: ChainSession | None = None
        self.matchers = None  # one grammar matcher per row, when the output is constrained

    async def start(self) -> None:
        if self.request.grammar is not None:
            grammar, grammars = self.request.grammar, self.model.grammars
            self.matchers = await self.model.run(lambda: [grammars.matcher(grammar) for _ in self.rows])
        if self.request.adapter is not None:
            self.prefix = await self.model.prefix(self.request.adapter)
        if self.request.max_tokens > 0:
            self.session = await self.admission.admit(lambda: self._open(self.state.virtual + self.state.length))

    async def _open(self, tokens: int) -> ChainSession:
        """A chain with room for `tokens` per row now (and more, in pages, as it grows)."""
        reserve = min(tokens + 1, self.max_length)
        hops = self.swarm.route(cache_tokens=len(self.rows) * reserve)
        session = ChainSession(hops, self.swarm, self.config, len(self.rows), self.max_length, self.connect,
                               reserve_length=reserve, on_closed=self.admission.changed, prompts=self.deep)
        await session.__aenter__()
        log.info("session %s: %d rows, chain %s", session.session_id, len(self.rows), session.describe())
        return session

    async def close(self) -> None:
        self.model.finished(self)
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for event in self._run():
                yield event
        finally:
            await self.close()

    async def _run(self) -> AsyncIterator[Event]:
        request, model, state = self.request, self.model, self.state
        choices = [_Choice(i, Detokenizer(model.decode)) for i in range(len(self.rows))]
        usage = Usage(sum(len(p) for p in request.prompts), 0)
        if request.max_tokens == 0:
            if request.echo:
                hidden = None
                if request.logprobs is not None:
                    hidden = await self._stateless_pass()
                for event in await self._echo(hidden):
                    yield event
            for c in choices:
                yield Finished(c.index, "length")
            yield usage
            return
        generator = torch.Generator().manual_seed(request.params.seed) if request.params.seed is not None else None
        # prefill: the whole prompt through the chain
        hidden = await self._step(await self._embed(state.sequence), state.attention_mask)
        if request.echo:  # the prefill's hidden states score the prompt: no pass of its own
            for event in await self._echo(hidden if request.logprobs is not None else None):
                yield event
        state.decoding()
        while True:  # decode steps: the ends' tick chooses each row's token and appends it to `state`
            tokens, embedded, scores = await model.sample(hidden[:, -1:], state, request.params, generator,
                                                          client=self, logprobs=request.logprobs,
                                                          matchers=self.matchers)
            for row, (choice, token) in enumerate(zip(choices, tokens)):
                if choice.reason is not None:
                    continue
                if scores is not None:
                    logprob, top = scores.at(row)
                    choice.cumulative += logprob
                    if token not in model.eos_ids:
                        choice.pending.append(TokenLogprob(token, logprob, top))
                for event in _advance(choice, token, request, model):
                    yield event
            if all(c.reason is not None for c in choices):
                break
            hidden = await self._step(embedded, None)
        state.finish()
        usage.completion_tokens = sum(c.generated for c in choices)
        yield usage

    async def _step(self, embedded: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Run `embedded` [batch, tokens, hidden] (the last tokens of the sequence so far, `mask`
        theirs) through the chain; after a preemption, the whole sequence on a new chain."""
        while True:
            try:
                return await self.session.step(embedded, mask)
            except (CacheFull, NeedsRecompute) as exc:
                self.swarm.failovers.preemptions += 1
                positions = self.state.virtual + self.state.length
                log.info("session %s: %s; waiting to recompute %d positions", self.session.session_id, exc, positions)
                await self.close()
                self.session = await self.admission.admit(lambda n=positions: self._open(n), front=True)
                embedded, mask = await self._embed(self.state.sequence), self.state.attention_mask

    async def _echo(self, hidden: torch.Tensor | None) -> list[TextDelta]:
        """Each row's prompt as the start of its text; scored from the last layer's `hidden`
        [rows, positions, hidden] when logprobs are asked for (the first token has none)."""
        request, virtual, prompt = self.request, self.request.virtual_tokens, self.state.prompt
        scored = None
        if hidden is not None:
            firsts = list(range(0, len(self.rows), request.n))  # the rows of one prompt share its scores
            scored = await self.model.score(hidden[firsts, virtual:], prompt[firsts], request.logprobs)
        deltas = []
        for row, tokens in enumerate(self.rows):
            entries = []
            if scored is not None:
                p, width = row // request.n, len(tokens)
                entries = [TokenLogprob(tokens[0], None)]
                offset = prompt.shape[1] - width  # left padding
                entries += [TokenLogprob(tokens[i], *scored.at(p, offset + i - 1)) for i in range(1, width)]
            deltas.append(TextDelta(row, request.prompt_texts[row // request.n], entries))
        return deltas

    async def _stateless_pass(self) -> torch.Tensor:
        """The whole prompt through every layer in one parallel pass that nothing is kept of on the
        servers (no session, no cache), rerouted on failures like fine-tuning's passes."""
        remote = RemoteLayers.in_gateway(self.swarm, self.connect, self.config)
        try:
            hidden, _ = await remote.forward(await self._embed(self.state.sequence), self.state.attention_mask,
                                             self.deep)
            return hidden
        finally:
            await remote.close()

    async def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of a whole sequence [rows, tokens], after the soft prompt when there is one."""
        embedded = await self.model.embed(ids)
        if self.prefix is None:
            return embedded
        prefix = self.prefix.to(embedded.dtype).expand(embedded.shape[0], -1, -1)
        return torch.cat([prefix, embedded], dim=1)


def _advance(choice: _Choice, token: int, request: GenerationRequest, model: GatewayModel):
    """Take one sampled token for one choice; yield the text it releases and its end, if any. Only
    the unsent tail is scanned for stop strings: text already sent ends before any stop can start."""
    if token in model.eos_ids:
        choice.reason = "stop"
    else:
        choice.generated += 1
        choice.unsent += choice.text.push(token)
        if choice.generated >= request.max_tokens:
            choice.reason = "length"
    if choice.reason is not None:
        choice.unsent += choice.text.flush()
    end, stopped = releasable(choice.unsent, request.stops)
    if stopped:
        choice.reason = "stop"
    elif choice.reason is not None:
        end = len(choice.unsent)  # the last piece: nothing more can complete a stop string
    if end > 0 or (choice.reason is not None and choice.pending):
        yield TextDelta(choice.index, choice.unsent[:end], choice.pending)
        choice.unsent, choice.pending = choice.unsent[end:], []
    if choice.reason is not None:
        yield Finished(choice.index, choice.reason, choice.cumulative)
