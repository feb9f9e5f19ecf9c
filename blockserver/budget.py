"""The KV-cache budget of one blockserver, in tokens (batch x length, summed over sessions).

Taking waits in FIFO order for room, up to a timeout; sessions already running that need another
page go before new work (an open waiting for room must never starve a session it is waiting
behind, which would then be preempted and recomputed). Giving back is synchronous, so cleanup that
gets cancelled halfway (a client vanishing, a test client cancelling its app) still returns every
token: nothing between forgetting a session and returning its tokens can be interrupted."""

from __future__ import annotations

import asyncio
from collections import deque

from shared.errors import CacheFull


class CacheBudget:
    def __init__(self, total: int):
        self.total = total
        self.left = total
        self._growth: deque[tuple[int, asyncio.Future]] = deque()  # running sessions' next pages
        self._new: deque[tuple[int, asyncio.Future]] = deque()  # opens and stateless passes

    async def take(self, tokens: int, timeout_s: float, growth: bool = False) -> None:
        """Reserve `tokens`, waiting up to `timeout_s` behind earlier requests of the same kind
        (`growth`: a running session's next page, served before any new work); CacheFull if the
        room never comes (or can never come)."""
        if tokens > self.total:
            raise CacheFull(f"{tokens} cache tokens exceed this server's whole budget of {self.total}")
        ahead = self._growth if growth else (self._growth or self._new)
        if not ahead and self.left >= tokens:
            self.left -= tokens
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (tokens, waiter)
        queue = self._growth if growth else self._new
        queue.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():  # granted just as we gave up: hand it back
                self.give(tokens)
            else:
                queue.remove(entry)
                waiter.cancel()
                self._grant()  # a large request leaving the head may let smaller ones in
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise CacheFull(f"no room for {tokens} cache tokens within {timeout_s}s "
                            f"({self.left} of {self.total} free)") from None

    def give(self, tokens: int) -> None:
        self.left += tokens
        self._grant()

    def _grant(self) -> None:
        for queue in (self._growth, self._new):
            while queue and queue[0][0] <= self.left:
                tokens, waiter = queue.popleft()
                if not waiter.done():
                    self.left -= tokens
                    waiter.set_result(None)
            if queue:
                return  # its head waits for room: nothing behind it, nor new work, goes first
