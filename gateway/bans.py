"""Servers that failed, kept out of routing for a while: 15 s, doubling on each repeat (PETALS'
policy), over an injected clock. Only real faults ban (a lost socket, no reply, a malformed or
non-finite result); a full cache or a refusal never does. Strikes decay as the server proves
itself again: every `decay_after` successful steps forgive one strike."""

from __future__ import annotations

import time
from collections.abc import Callable


class Bans:
    def __init__(self, base_s: float = 15.0, max_s: float = 600.0, decay_after: int = 16,
                 clock: Callable[[], float] = time.monotonic):
        self.base_s, self.max_s, self.decay_after, self._clock = base_s, max_s, decay_after, clock
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self._successes: dict[str, int] = {}

    def ban(self, server_id: str) -> float:
        """Ban `server_id`; return for how many seconds."""
        strikes = self._strikes.get(server_id, 0) + 1
        self._strikes[server_id] = strikes
        self._successes[server_id] = 0
        seconds = min(self.max_s, self.base_s * 2 ** (strikes - 1))
        self._until[server_id] = self._clock() + seconds
        return seconds

    def succeeded(self, server_id: str) -> None:
        """A step on `server_id` went well."""
        if server_id not in self._strikes:
            return
        done = self._successes.get(server_id, 0) + 1
        if done < self.decay_after:
            self._successes[server_id] = done
            return
        self._successes[server_id] = 0
        self._strikes[server_id] -= 1
        if not self._strikes[server_id]:
            del self._strikes[server_id], self._successes[server_id]

    def strikes(self, server_id: str) -> int:
        return self._strikes.get(server_id, 0)

    def active(self) -> set[str]:
        now = self._clock()
        for server_id in [s for s, until in self._until.items() if until <= now]:
            del self._until[server_id]
        return set(self._until)
