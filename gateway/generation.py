"""The generation loop (Algorithm 1 of the paper, gateway side): embed, step through the chain,
sample, stream. One async generator serves streaming and non-streaming requests alike."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from gateway.chain import ChainConfig, ChainSession
from gateway.channel import Connect
from gateway.model import GatewayModel
from gateway.requests import GenerationRequest
from gateway.stops import releasable
from gateway.swarm import Swarm

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass
class TextDelta:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    reason: FinishReason


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


async def generate(request: GenerationRequest, model: GatewayModel, swarm: Swarm, config: ChainConfig,
                   connect: Connect) -> AsyncIterator[Event]:
    rows = [prompt for prompt in request.prompts for _ in range(request.n)]
    choices = [_Choice(i) for i in range(len(rows))]
    usage = Usage(sum(len(p) for p in request.prompts), 0)
    if request.max_tokens == 0:
        for c in choices:
            yield Finished(c.index, "length")
        yield usage
        return
    ids, mask = _left_pad(rows, model.pad_id)
    generator = torch.Generator().manual_seed(request.params.seed) if request.params.seed is not None else None
    counts = torch.zeros(len(rows), model.vocab_size)
    max_length = ids.shape[1] + request.max_tokens
    hops = swarm.route(cache_tokens=len(rows) * max_length)
    async with ChainSession(hops, swarm, config, len(rows), max_length, connect) as session:
        log.info("session %s: %d rows, chain %s", session.session_id, len(rows), session.describe())
        hidden = await session.step(await model.embed(ids), mask if bool((mask == 0).any()) else None)
        while True:
            tokens = (await model.next_tokens(hidden[:, -1:], counts, request.params, generator)).tolist()
            for choice, token in zip(choices, tokens):
                if choice.reason is not None:
                    continue
                for event in _advance(choice, token, request, model, counts):
                    yield event
            if all(c.reason is not None for c in choices):
                break
            next_ids = torch.tensor(tokens, dtype=torch.long)[:, None]
            hidden = await session.step(await model.embed(next_ids))
    usage.completion_tokens = sum(len(c.tokens) for c in choices)
    yield usage


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
    if end > choice.sent:
        yield TextDelta(choice.index, text[choice.sent:end])
        choice.sent = end
    if choice.reason is not None:
        yield Finished(choice.index, choice.reason)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] ids and the 0/1 mask, padded on the left."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, longest - len(row):] = 1
    return ids, mask
