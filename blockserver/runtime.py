"""The span runtime: one compute thread owns the weights and every session's KV cache.

The event loop validates and moves bytes; every torch operation (cache creation, steps, release)
runs on the single compute thread, in the order submitted.

The KV-cache budget is counted in tokens (batch x length per session). A session reserves pages
as it grows rather than its whole `max_length` at `open`: the first step's worth (`reserve_length`)
at open, then more room when a step needs it, a quarter of what it holds at a time (at least a
page), so the copies that growing costs stay amortized. A step that cannot get room within the
allocation timeout is refused with `cache_full`, and changes nothing."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from blockserver.budget import CacheBudget
from shared.compute import ComputeThread
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
    reserved: int  # tokens of room per row, taken from the budget

    @property
    def tokens(self) -> int:
        """What this session holds of the budget."""
        return self.batch_size * self.reserved


class Runtime:
    def __init__(self, layers: LoadedSpan, cache_tokens: int, compute: ComputeThread, prefill_chunk_tokens: int = 512,
                 page_tokens: int = 128, alloc_timeout_s: float = 5.0):
        self.layers = layers  # the server's span of layers, loaded
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.page_tokens = page_tokens
        self.alloc_timeout_s = alloc_timeout_s
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

    def _room_for(self, tokens: int, held: int, max_length: int) -> int:
        """Per-row room to reserve so that `tokens` fit: whole pages, at least a quarter more than held."""
        wanted = max(tokens, held + held // 4, self.page_tokens)
        pages = -(-wanted // self.page_tokens)
        return min(max_length, pages * self.page_tokens)

    async def open(self, session_id: str, batch_size: int, max_length: int, start: int, end: int,
                   reserve_length: int | None = None) -> Session:
        if session_id in self.sessions:
            raise BadRequest(f"session {session_id!r} is already open on this server")
        self.sessions[session_id] = None  # claimed before the first await: a concurrent open of this id fails
        reserved = self._room_for(min(reserve_length or max_length, max_length), 0, max_length)
        try:
            await self.budget.take(batch_size * reserved, self.alloc_timeout_s)
        except BaseException:
            del self.sessions[session_id]
            raise
        try:
            cache = await self._compute(self.layers.new_cache, batch_size, max_length, reserved)
        except BaseException:
            del self.sessions[session_id]
            self.budget.give(batch_size * reserved)
            raise
        session = Session(session_id, batch_size, max_length, cache, start, end, reserved)
        self.sessions[session_id] = session
        self.sessions_opened += 1
        return session

    async def step(self, session: Session, position: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                   hypo_ids: torch.Tensor | None) -> torch.Tensor:
        needed = position + hidden.shape[1]
        if needed > session.reserved:  # take more pages first; a refusal leaves the session as it was
            room = self._room_for(needed, session.reserved, session.max_length)
            await self.budget.take(session.batch_size * (room - session.reserved), self.alloc_timeout_s)
            if self.sessions.get(session.session_id) is not session:  # closed while we waited
                self.budget.give(session.batch_size * (room - session.reserved))
                raise BadRequest("the session was closed")
            session.reserved = room
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
    cache = session.cache
    if hypo_ids is not None and bool(((hypo_ids < 0) | (hypo_ids >= session.batch_size)).any()):
        raise BadRequest(f"hypo_ids must be indices in [0, {session.batch_size})")  # before anything changes
    cache.truncate(position)  # replays and rollbacks resend from `position`
    cache.grow(session.reserved)
    if hypo_ids is not None:
        cache.reorder(hypo_ids)
    # Long prefills (and failover replays) go in chunks, so that the attention scores of one
    # chunk [batch, heads, chunk, position + chunk] bound the memory, not those of the whole prompt.
    outputs = []
    for start in range(0, hidden.shape[1], chunk):
        piece_mask = None if mask is None else mask[:, start:start + chunk]
        outputs.append(span.step(hidden[:, start:start + chunk], cache, piece_mask, session.start, session.end))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _drop(session: Session) -> None:
    session.cache.free()
