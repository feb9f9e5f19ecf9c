"""Admission: a bounded FIFO queue in front of the swarm's KV caches.

A request whose chain has no room (a blockserver answered `cache_full`) is back-pressure, not a
failure: it waits here, in arrival order, and tries again whenever room may have come back (a
session of this gateway closed, a heartbeat arrived) or every `retry_interval_s`. Only the head of
the queue tries, so later requests cannot starve earlier ones. A full queue, or a wait longer
than `timeout_s`, is refused with Overloaded (HTTP 429 with Retry-After). A generation that runs
out of room mid-answer re-enters at the front (it is preempted and recomputed, as vLLM does)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.errors import CacheFull, Overloaded

T = TypeVar("T")


class Admission:
    def __init__(self, max_queue: int = 128, timeout_s: float = 60.0, retry_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.max_queue, self.timeout_s, self.retry_interval_s = max_queue, timeout_s, retry_interval_s
        self._clock = clock
        self._queue: deque[asyncio.Event] = deque()  # one event per waiting request; the head may try
        self.admitted = 0
        self.refused = 0  # 429s

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def admit(self, attempt: Callable[[], Awaitable[T]], front: bool = False) -> T:
        """Run `attempt()` (open a chain) when there is room: at once if nobody waits, else in turn.
        `attempt` raises CacheFull when the room is not there; anything else propagates."""
        if not self._queue:
            admitted, result = await self._try(attempt)
            if admitted:
                return result
        if len(self._queue) >= self.max_queue and not front:
            self.refused += 1
            raise Overloaded(f"{len(self._queue)} requests are waiting for room on the swarm, the most this "
                             f"gateway queues")
        turn = asyncio.Event()
        if front:
            self._queue.appendleft(turn)
        else:
            self._queue.append(turn)
        deadline = self._clock() + self.timeout_s
        try:
            while True:
                if self._queue[0] is turn:
                    admitted, result = await self._try(attempt)
                    if admitted:
                        return result
                left = deadline - self._clock()
                if left <= 0:
                    self.refused += 1
                    raise Overloaded(f"no room on the swarm within {self.timeout_s:.0f}s")
                turn.clear()
                try:
                    await asyncio.wait_for(turn.wait(), min(left, self.retry_interval_s))
                except TimeoutError:
                    pass
        finally:
            self._queue.remove(turn)
            self.changed()  # the next one's turn

    async def _try(self, attempt: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        try:
            result = await attempt()
        except CacheFull:
            return False, None
        self.admitted += 1
        return True, result

    def changed(self) -> None:
        """Room may have come back: let the head of the queue try again."""
        if self._queue:
            self._queue[0].set()
