"""Ticks: work that arrives while the compute thread is busy waits, and is then handed to the
compute thread in one call. At low load a tick holds one item and adds no delay (there is no
timer); under load every waiting item shares one pass over the weights."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from shared.compute import ComputeThread

log = logging.getLogger(__name__)

W = TypeVar("W")
PENDING = object()  # an outcome meaning "not finished: keep the item for the next tick"


class Linger:
    """How long a tick may wait for more work: while fewer items wait than the clients that asked
    within the last second (the others are a hop away and come in a burst), up to `max_s` after the
    oldest waiting item arrived. Alone, or with everyone waiting, a tick starts at once."""

    def __init__(self, max_s: float, clock=time.monotonic):
        self.max_s, self._clock = max_s, clock
        self._last: dict[object, float] = {}  # client -> when it last asked
        self.arrivals: dict[int, float] = {}  # id(item) -> when it arrived

    def arrived(self, client: object, item: object) -> None:
        now = self._clock()
        self._last[client] = now
        self.arrivals[id(item)] = now

    def forget(self, client: object) -> None:
        self._last.pop(client, None)

    def __call__(self, waiting: list[object]) -> float:
        if not self.max_s or not waiting:
            return 0.0
        now = self._clock()
        for client in [c for c, t in self._last.items() if now - t > 1.0]:
            del self._last[client]
        if len(waiting) >= len(self._last):
            return 0.0
        oldest = min(self.arrivals.get(id(i), now) for i in waiting)
        return max(0.0, self.max_s - (now - oldest))

    def done(self, item: object) -> None:
        self.arrivals.pop(id(item), None)


class Ticker(Generic[W]):
    """`select(queue)` picks the items of the next tick (on the event loop); `run(items)` runs them
    on the compute thread and returns one outcome per item: a result, an exception, or PENDING."""

    def __init__(self, compute: ComputeThread, select: Callable[[list[W]], list[W]],
                 run: Callable[[list[W]], list[object]], name: str,
                 linger: Callable[[list[W]], float] = lambda queue: 0.0):
        self._compute, self._select, self._run, self.name = compute, select, run, name
        self._linger = linger  # seconds a tick may wait for more work to join it (0: go now)
        self._queue: list[tuple[W, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.ticks = 0
        self.items = 0

    async def submit(self, item: W):
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=self.name)
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                while (wait := self._linger([i for i, _ in self._queue])) > 0:
                    # others are about to join: a bigger tick reads the weights once for all of them
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except TimeoutError:
                        pass
                self._queue = [(i, f) for i, f in self._queue if not f.done()]  # callers that gave up
                futures = {id(i): f for i, f in self._queue}
                chosen = self._select([i for i, _ in self._queue])
                if not chosen:
                    break
                try:
                    outcomes = await self._compute.run(self._run, chosen)
                except Exception as exc:  # run() isolates its items' errors; this is a bug in it
                    log.exception("tick of %s failed", self.name)
                    outcomes = [exc] * len(chosen)
                self.ticks += 1
                self.items += len(chosen)
                for item, outcome in zip(chosen, outcomes):
                    if outcome is PENDING:
                        continue
                    if isinstance(self._linger, Linger):
                        self._linger.done(item)
                    future = futures[id(item)]
                    self._queue = [(i, f) for i, f in self._queue if i is not item]
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._queue:
            if not future.done():
                future.cancel()
