"""The span runtime: one compute thread owns the weights and every session's KV cache.

The event loop validates and moves bytes; every torch operation (cache creation, steps, release)
runs on the single compute thread, in the order submitted.

Steps go through a scheduler (shared/ticks.py): while the compute thread is busy, steps queue;
each tick then runs every waiting decode step (one token per row) and chunks of the waiting long
steps (prompts, replays; `prefill_chunk_tokens` token-rows in all) of sessions over the same
layers as one batched pass (shared/models/batch.py). A long prompt therefore delays the others'
next token by one chunk at most, prompts arriving together start together, and N sessions
decoding together read the weights once per tick instead of N times.

The KV-cache budget is counted in tokens (batch x length per session). A session reserves pages
as it grows rather than its whole `max_length` at `open`: the first step's worth (`reserve_length`)
at open, then more room when a step needs it, a quarter of what it holds at a time (at least a
page), so the copies that growing costs stay amortized. A step that cannot get room within the
allocation timeout is refused with `cache_full`, and changes nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blockserver.budget import CacheBudget
from shared.compute import ComputeThread
from shared.errors import BadRequest, SessionLost
from shared.models.base import LoadedSpan
from shared.models.cache import SpanCache
from shared.ticks import PENDING, Linger, Ticker

MAX_TICK_ROWS = 256  # decode rows batched in one tick

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
    wire: str = "raw"  # codec of the hidden states this session's results carry

    @property
    def tokens(self) -> int:
        """What this session holds of the budget."""
        return self.batch_size * self.reserved


@dataclass(eq=False)
class Work:
    """One step of one session, waiting for (or part-way through) the compute thread."""

    session: Session
    position: int
    hidden: torch.Tensor  # [rows, tokens, hidden]
    mask: torch.Tensor | None
    hypo_ids: torch.Tensor | None
    prompts: torch.Tensor | None = None  # deep prompts [layers, P, hidden] (a tuned prompt's first steps)
    reply: Callable[[torch.Tensor], object] | None = None  # makes the answer of the output (encodes the frame)
    done: int = 0  # tokens of a long step already run
    chunk: int = 1  # tokens to run in the tick it was chosen for
    outputs: list[torch.Tensor] = field(default_factory=list)
    decode: bool = field(init=False)

    def __post_init__(self):
        self.decode = self.hidden.shape[1] == 1 and (self.mask is None or bool(self.mask.all()))

    def piece(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states and padding mask of this tick's chunk."""
        part = slice(self.done, self.done + self.chunk)
        return self.hidden[:, part], (None if self.mask is None else self.mask[:, part])


class Runtime:
    def __init__(self, layers: LoadedSpan, cache_tokens: int, compute: ComputeThread, prefill_chunk_tokens: int = 512,
                 page_tokens: int = 128, alloc_timeout_s: float = 5.0, linger_s: float = 0.0):
        self.layers = layers  # the server's span of layers, loaded
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.page_tokens = page_tokens
        self.alloc_timeout_s = alloc_timeout_s
        self.budget = CacheBudget(cache_tokens)
        self.sessions: dict[str, Session | None] = {}  # None: being opened
        self.sessions_opened = 0  # since start: shows where routing sent sessions
        self.timed: Callable[[str, float], None] = lambda kind, seconds: None  # metrics' hook
        self._compute = compute.run
        self.linger = Linger(linger_s)  # counts decode steps only: prompts never wait for company
        self.scheduler: Ticker[Work] = Ticker(compute, lambda queue: _choose(queue, self.prefill_chunk_tokens),
                                              self._run_tick, "steps",
                                              lambda queue: self.linger([w for w in queue if w.decode]))
        self.batching = True  # off if the family's attention cannot be batched (logged once)

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
                   hypo_ids: torch.Tensor | None, prompts: torch.Tensor | None = None,
                   reply: Callable[[torch.Tensor], object] | None = None) -> object:
        """The step's output [rows, tokens, hidden], or what `reply` makes of it on the compute
        thread (the encoded frame: the event loop only sends it)."""
        needed = position + hidden.shape[1]
        if needed > session.reserved:  # take more pages first; a refusal leaves the session as it was
            room = self._room_for(needed, session.reserved, session.max_length)
            await self.budget.take(session.batch_size * (room - session.reserved), self.alloc_timeout_s, growth=True)
            if self.sessions.get(session.session_id) is not session:  # closed while we waited
                self.budget.give(session.batch_size * (room - session.reserved))
                raise BadRequest("the session was closed")
            session.reserved = room
        work = Work(session, position, hidden, mask, hypo_ids, prompts, reply)
        if work.decode:
            self.linger.arrived(session.session_id, work)
        started = time.monotonic()
        out = await self.scheduler.submit(work)
        self.timed("decode" if work.decode else "prefill", time.monotonic() - started)
        return out

    async def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
                      start: int, end: int) -> torch.Tensor:
        """A stateless pass (scoring, fine-tuning) over layers [start, end)."""
        started = time.monotonic()
        outs = await self._stateless(self.layers.forward, hidden, mask, prompts, start, end)
        self.timed("forward", time.monotonic() - started)
        return torch.cat(outs)

    async def backward(self, hidden: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None,
                       prompts: torch.Tensor | None, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients with respect to the input and the deep prompts of a stateless pass."""
        started = time.monotonic()
        parts = await self._stateless(self.layers.backward, hidden, mask, prompts, start, end, grad)
        self.timed("backward", time.monotonic() - started)
        grad_prompts = None if prompts is None else torch.stack([p for _, p in parts]).sum(0)
        return torch.cat([g for g, _ in parts]), grad_prompts

    async def _stateless(self, fn, hidden, mask, prompts, start, end, grad=None) -> list:
        """Run `fn` over groups of rows of at most `prefill_chunk_tokens` token-rows (one row at
        least), each a compute call of its own (decode ticks run between them), each metered
        against the cache budget while it runs: a pass costs what that many cached tokens would."""
        rows, tokens = hidden.shape[:2]
        group = max(1, self.prefill_chunk_tokens // tokens)
        results = []
        for first in range(0, rows, group):
            part = slice(first, first + group)
            cost = min(group, rows - first) * tokens
            await self.budget.take(cost, self.alloc_timeout_s)
            try:
                args = [hidden[part]] + ([grad[part]] if grad is not None else [])
                results.append(await asyncio.shield(self._compute(
                    fn, *args, None if mask is None else mask[part], prompts, start, end)))
            finally:
                self.budget.give(cost)
        return results

    async def close(self, session_id: str) -> None:
        """Forget the session and return its tokens at once (no await in between, so a cancelled
        close still returns them), then free its memory on the compute thread."""
        session = self.sessions.get(session_id)
        if session is None:
            return  # unknown, or still being opened (its open cleans up)
        del self.sessions[session_id]
        self.linger.forget(session_id)
        self.budget.give(session.tokens)
        await asyncio.shield(self._compute(_drop, session))  # the cache is freed on the thread that made it

    def open_sessions(self) -> list[Session]:
        return [s for s in self.sessions.values() if s is not None]

    async def shutdown(self) -> None:
        for session in self.open_sessions():
            await self.close(session.session_id)
        await self.scheduler.close()

    # ---- on the compute thread
    def _run_tick(self, works: list[Work]) -> list[object]:
        """One tick: for each chosen work its next `chunk` tokens (a decode token, or a chunk of a
        long step), sessions over the same layers in one batched pass. Each work's outcome is its
        output, its exception, or PENDING (a long step not finished yet)."""
        outcomes: dict[int, object] = {}
        groups: dict[tuple[int, int], list[Work]] = defaultdict(list)
        for work in works:
            if self.sessions.get(work.session.session_id) is not work.session:
                outcomes[id(work)] = SessionLost("the session was closed")
                continue
            try:
                if work.done == 0:
                    _begin(work)
                groups[(work.session.start, work.session.end)].append(work)
            except Exception as exc:
                outcomes[id(work)] = exc
        for (start, end), group in groups.items():
            for work, out in self._step_group(group, start, end).items():
                if isinstance(out, BaseException):
                    outcomes[id(work)] = out
                    continue
                work.outputs.append(out)
                work.done += out.shape[1]
                if work.done < work.hidden.shape[1]:
                    outcomes[id(work)] = PENDING
                else:
                    out = work.outputs[0] if len(work.outputs) == 1 else torch.cat(work.outputs, 1)
                    try:
                        outcomes[id(work)] = out if work.reply is None else work.reply(out)
                    except Exception as exc:
                        outcomes[id(work)] = exc
        return [outcomes[id(w)] for w in works]

    def _step_group(self, group: list[Work], start: int, end: int) -> dict[Work, object]:
        """The next piece of each work of `group`: one batched pass when the family allows (any
        pieces when ragged, single decode tokens when padded; a batch of one is a batch, so a
        session's arithmetic is the same alone and in company), else one session at a time."""
        pieces = {w: w.piece() for w in group}
        ragged = self.layers.family.batching == "ragged"
        batchable = [w for w in group if w.prompts is None and
                     (ragged or (pieces[w][0].shape[1] == 1 and pieces[w][1] is None))]
        outcomes: dict[Work, object] = {}
        if batchable and self.batching:
            try:
                outs = self.layers.step_batch([pieces[w][0] for w in batchable], [w.session.cache for w in batchable],
                                              [pieces[w][1] for w in batchable], start, end)
                outcomes.update(zip(batchable, outs))
            except RuntimeError as exc:
                if "batch it padded" not in str(exc):
                    raise
                self.batching = False
                log.warning("the %s family's attention cannot be batched (%s); steps run one session at a time",
                            self.layers.family.name, exc)
            except Exception as exc:  # one session's bad input must not fail the others: run them one by one
                log.debug("batched tick failed (%s); running its sessions one by one", exc)
        for w in group:
            if w not in outcomes:
                try:
                    outcomes[w] = self.layers.step(pieces[w][0], w.session.cache, pieces[w][1], start, end, w.prompts)
                except Exception as exc:
                    outcomes[w] = exc
        return outcomes


def _choose(queue: list[Work], chunk_tokens: int) -> list[Work]:
    """The works of the next tick: every waiting decode step (up to MAX_TICK_ROWS rows), then
    chunks of long steps, oldest first, within `chunk_tokens` token-rows (at least one chunk)."""
    chosen, rows, budget = [], 0, chunk_tokens
    for work in queue:
        if work.decode and rows + work.hidden.shape[0] <= MAX_TICK_ROWS:
            work.chunk = 1
            chosen.append(work)
            rows += work.hidden.shape[0]
    for work in queue:
        if work.decode or budget <= 0:
            continue
        left = work.hidden.shape[1] - work.done
        work.chunk = max(1, min(left, budget // work.hidden.shape[0]))
        budget -= work.chunk * work.hidden.shape[0]
        chosen.append(work)
    return chosen


def _begin(work: Work) -> None:
    """Bring the session's cache to the step's position, room and beam order; a refusal changes nothing."""
    session, cache = work.session, work.session.cache
    if work.hypo_ids is not None and bool(((work.hypo_ids < 0) | (work.hypo_ids >= session.batch_size)).any()):
        raise BadRequest(f"hypo_ids must be indices in [0, {session.batch_size})")
    cache.truncate(work.position)  # replays and rollbacks resend from `position`
    cache.grow(session.reserved)
    if work.hypo_ids is not None:
        cache.reorder(work.hypo_ids)


def _drop(session: Session) -> None:
    session.cache.free()
