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
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent
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
        self.ids, self.mask = _left_pad(self.rows, model.pad_id)
        adapter = request.adapter
        virtual = request.virtual_tokens
        if virtual:  # the soft prompt's positions come first, before any padding: every row sees them
            self.mask = torch.cat([torch.ones(len(self.rows), virtual, dtype=torch.long), self.mask], dim=1)
        self.deep = adapter.deep_prompts if adapter is not None else None
        self.prefix: torch.Tensor | None = None  # the soft prompt as the first layer receives it
        self.max_length = virtual + self.ids.shape[1] + request.max_tokens
        self.session: ChainSession | None = None
        self.matchers = None  # one grammar matcher per row, when the output is constrained

    async def start(self) -> None:
        if self.request.grammar is not None:
            grammar, grammars = self.request.grammar, self.model.grammars
            self.matchers = await self.model.run(lambda: [grammars.matcher(grammar) for _ in self.rows])
        if self.request.adapter is not None:
            self.prefix = await self.model.prefix(self.request.adapter)
        if self.request.max_tokens > 0:
            self.session = await self.admission.admit(lambda: self._open(self.mask.shape[1]))

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
        request, model = self.request, self.model
        choices = [_Choice(i) for i in range(len(self.rows))]
        usage = Usage(sum(len(p) for p in request.prompts), 0)
        sequence, mask = self.ids, self.mask  # every token fed so far (and the mask of every position)
        if request.max_tokens == 0:
            if request.echo:
                hidden = None
                if request.logprobs is not None:
                    hidden = await self._stateless_pass(sequence, mask)
                for event in await self._echo(hidden):
                    yield event
            for c in choices:
                yield Finished(c.index, "length")
            yield usage
            return
        generator = torch.Generator().manual_seed(request.params.seed) if request.params.seed is not None else None
        counts = torch.zeros(len(self.rows), model.vocab_size)
        hidden = await self._step(await self._embed(sequence), mask, sequence, mask)
        if request.echo:  # the prefill's hidden states score the prompt: no pass of its own
            for event in await self._echo(hidden if request.logprobs is not None else None):
                yield event
        while True:
            chosen, embedded, scores = await model.sample(hidden[:, -1:], counts, request.params, generator,
                                                          client=self, logprobs=request.logprobs,
                                                          matchers=self.matchers)
            tokens = chosen.tolist()
            for row, (choice, token) in enumerate(zip(choices, tokens)):
                if choice.reason is not None:
                    continue
                if scores is not None:
                    choice.cumulative += float(scores.chosen[row])
                    if token not in model.eos_ids:
                        choice.pending.append(_scored(token, scores, row))
                for event in _advance(choice, token, request, model, counts):
                    yield event
            if all(c.reason is not None for c in choices):
                break
            next_ids = chosen[:, None]
            sequence = torch.cat([sequence, next_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            hidden = await self._step(embedded, None, sequence, mask)
        usage.completion_tokens = sum(len(c.tokens) for c in choices)
        yield usage

    async def _step(self, embedded: torch.Tensor, mask: torch.Tensor | None, sequence: torch.Tensor,
                    sequence_mask: torch.Tensor) -> torch.Tensor:
        """Run `embedded` [batch, tokens, hidden] (the last tokens of `sequence`) through the chain."""
        padded = sequence_mask if bool((sequence_mask == 0).any()) else None
        if mask is not None and not bool((mask == 0).any()):
            mask = None
        while True:
            try:
                return await self.session.step(embedded, mask)
            except (CacheFull, NeedsRecompute) as exc:
                self.swarm.failovers.preemptions += 1
                log.info("session %s: %s; waiting to recompute %d positions", self.session.session_id, exc,
                         sequence.shape[1])
                await self.close()
                self.session = await self.admission.admit(lambda: self._open(sequence.shape[1]), front=True)
                embedded, mask = await self._embed(sequence), padded  # recomputed on the new chain

    async def _echo(self, hidden: torch.Tensor | None) -> list[TextDelta]:
        """Each row's prompt as the start of its text; scored from the last layer's `hidden`
        [rows, positions, hidden] when logprobs are asked for (the first token has none)."""
        request, virtual = self.request, self.request.virtual_tokens
        scored = None
        if hidden is not None:
            firsts = list(range(0, len(self.rows), request.n))  # the rows of one prompt share its scores
            scored = await self.model.score(hidden[firsts, virtual:], self.ids[firsts], request.logprobs)
        deltas = []
        for row, prompt in enumerate(self.rows):
            entries = []
            if scored is not None:
                p, width = row // request.n, len(prompt)
                entries = [TokenLogprob(prompt[0], None)]
                offset = self.ids.shape[1] - width  # left padding
                entries += [_scored(prompt[i], scored, p, offset + i - 1) for i in range(1, width)]
            deltas.append(TextDelta(row, request.prompt_texts[row // request.n], entries))
        return deltas

    async def _stateless_pass(self, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The whole prompt through every layer in one parallel pass that nothing is kept of on the
        servers (no session, no cache), rerouted on failures like fine-tuning's passes."""
        remote = RemoteLayers.in_gateway(self.swarm, self.connect, self.config)
        try:
            padded = mask if bool((mask == 0).any()) else None
            hidden, _ = await remote.forward(await self._embed(sequence), padded, self.deep)
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


def _advance(choice: _Choice, token: int, request: GenerationRequest, model: GatewayModel, counts):
    """Take one sampled token for one choice; yield the text it releases and its end, if any."""
    if token in model.eos_ids:
        choice.reason = "stop"
    else:
        choice.tokens.append(token)
        counts[choice.index, token] += 1
        if len(choice.tokens) >= request.max_tokens:
            choice.reason = "length"
    text = model.decode(choice.tokens)
    end, stopped = releasable(text, request.stops)
    if stopped:
        choice.reason = "stop"
    elif choice.reason is not None:
        end = len(text)  # the last piece: nothing more can complete a stop string
    if end > choice.sent or (choice.reason is not None and choice.pending):
        yield TextDelta(choice.index, text[choice.sent:end], choice.pending)
        choice.sent, choice.pending = max(end, choice.sent), []
    if choice.reason is not None:
        yield Finished(choice.index, choice.reason, choice.cumulative)


def _scored(token: int, scores, *where: int) -> TokenLogprob:
    """`token` with its score at `where` (a row of a sampling tick's Scores, or row and position of
    a scored prompt's)."""
    return TokenLogprob(token, float(scores.chosen[where]),
                        list(zip(scores.top_ids[where].tolist(), scores.top_values[where].tolist())))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] ids and the 0/1 mask, padded on the left."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, longest - len(row):] = 1
    return ids, mask
