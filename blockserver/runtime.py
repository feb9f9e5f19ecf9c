"""The span runtime: one compute thread owns the weights and every session's KV cache.

The event loop validates and moves bytes; every torch operation (cache creation, steps, release)
runs on the single compute thread, in the order submitted. The KV-cache budget is counted in
tokens (batch × max_length per session), reserved at `open` and released at `close`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from shared.compute import ComputeThread
from blockserver.budget import CacheBudget
from shared.errors import BadRequest
from shared.models.base import LoadedSpan
from shared.models.cache import SpanCache

log = logging.getLogger(__name__)


@dataclass
class Session:
    session_id: str
    batch_size: int
    max_length: int
    cache: SpanCache
    start: int  # the layers this session runs: [start, end), within the server's span
    end: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


class Runtime:
    def __init__(self, layers: LoadedSpan, cache_tokens: int, compute: ComputeThread, prefill_chunk_tokens: int = 512):
        self.layers = layers  # the server's span of layers, loaded
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.budget = CacheBudget(cache_tokens)
        self.sessions: dict[str, Session | None] = {}  # None: being opened
        self.sessions_opened = 0  # since start: shows where routing sent sessions
        self._compute = compute.run

    @property
    def cache_tokens(self) -> int:
        return self.budget.total

    @property
    def cache_tokens_left(self) -> int:
        return self.budget.left

    async def open(self, session_id: str, batch_size: int, max_length: int, alloc_timeout_s: float,
                   start: int, end: int) -> Session:
        if session_id in self.sessions:
            raise BadRequest(f"session {session_id!r} is already open on this server")
        self.sessions[session_id] = None  # claimed before the first await: a concurrent open of this id fails
        tokens = batch_size * max_length
        try:
            await self.budget.take(tokens, alloc_timeout_s)
        except BaseException:
            del self.sessions[session_id]
            raise
        try:
            cache = await self._compute(self.layers.new_cache, batch_size, max_length)
        except BaseException:
            del self.sessions[session_id]
            self.budget.give(tokens)
            raise
        session = Session(session_id, batch_size, max_length, cache, start, end)
        self.sessions[session_id] = session
        self.sessions_opened += 1
        return session

    async def step(self, session: Session, position: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                   hypo_ids: torch.Tensor | None) -> torch.Tensor:
        return await self._compute(_run_step, self.layers, session, position, hidden, mask, hypo_ids,
                                   self.prefill_chunk_tokens)

    async def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return await self._compute(self.layers.forward, hidden, mask)

    async def close(self, session_id: str) -> None:
        """Forget the session and return its tokens at once (no await in between, so a cancelled
        close still returns them), then free its memory on the compute thread."""
        session = self.sessions.get(session_id)
        if session is None:
            return  # unknown, or still being opened (its open cleans up)
        del self.sessions[session_id]
        self.budget.give(session.tokens)
        await asyncio.shield(self._compute(_drop, session))  # the cache is freed on the thread that made it

    def open_sessions(self) -> list[Session]:
        return [s for s in self.sessions.values() if s is not None]

    async def shutdown(self) -> None:
        for session in self.open_sessions():
            await self.close(session.session_id)


def _run_step(span: LoadedSpan, session: Session, position: int, hidden, mask, hypo_ids, chunk: int):
    session.cache.truncate(position)  # replays and rollbacks resend from `position`
    if hypo_ids is not None:
        session.cache.reorder(hypo_ids)
    # Long prefills (and failover replays) go in chunks, so that the attention scores of one
    # chunk [batch, heads, chunk, position + chunk] bound the memory, not those of the whole prompt.
    outputs = []
    for start in range(0, hidden.shape[1], chunk):
        piece_mask = None if mask is None else mask[:, start:start + chunk]
        outputs.append(span.step(hidden[:, start:start + chunk], session.cache, piece_mask, session.start, session.end))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _drop(session: Session) -> None:
    session.cache.free()
