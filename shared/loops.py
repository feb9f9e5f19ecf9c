"""Supervised background loops: an exception is logged and the loop goes on after a pause.

A loop that dies silently is worse than one that crashes: a blockserver whose heartbeat task
raised once would keep answering /health while it vanishes from every registry."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(name: str, interval_s: Callable[[], float] | float, body: Callable[[], Awaitable[None]],
                first_delay_s: float = 0.0, backoff_s: float = 1.0) -> None:
    """Run `body()` now (after `first_delay_s`) and then every `interval_s` (a number, or a function
    drawn anew each time), until cancelled. Exceptions are logged with their traceback and the
    loop continues after `backoff_s`; cancellation ends it."""
    if first_delay_s:
        await asyncio.sleep(first_delay_s)
    while True:
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background loop %r failed; it goes on in %.1fs", name, backoff_s)
            await asyncio.sleep(backoff_s * random.uniform(0.8, 1.2))
            continue
        await asyncio.sleep(interval_s() if callable(interval_s) else interval_s)


class TaskSet:
    """Background tasks owned by a lifespan: started by name, all cancelled and awaited at the end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def start(self, coroutine: Awaitable[None], name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
