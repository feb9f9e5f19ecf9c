"""Servers that failed, kept out of routing for a while: 15 s, doubling on each repeat (PETALS'
policy), over an injected clock."""

from __future__ import annotations

import time
from collections.abc import Callable


class Bans:
    def __init__(self, base_s: float = 15.0, max_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.base_s, self.max_s, self._clock = base_s, max_s, clock
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def ban(self, server_id: str) -> float:
        """Ban `server_id`; return for how many seconds."""
        strikes = self._strikes.get(server_id, 0) + 1
        self._strikes[server_id] = strikes
        seconds = min(self.max_s, self.base_s * 2 ** (strikes - 1))
        self._until[server_id] = self._clock() + seconds
        return seconds

    def active(self) -> set[str]:
        now = self._clock()
        return {s for s, until in self._until.items() if until > now}
