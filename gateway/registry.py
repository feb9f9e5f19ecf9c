"""The registry: soft-state table of blockservers fed by heartbeats. Pure bookkeeping over an
injected clock, so tests age records without sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.records import ServerInfo, ServerState


@dataclass
class Entry:
    info: ServerInfo
    expires_at: float


class Registry:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._entries: dict[str, Entry] = {}

    def heartbeat(self, info: ServerInfo) -> None:
        if info.state == ServerState.offline:
            self._entries.pop(info.server_id, None)
            return
        self._entries[info.server_id] = Entry(info, self._clock() + info.ttl_s)

    def get(self, server_id: str) -> ServerInfo | None:
        entry = self._entries.get(server_id)
        return entry.info if entry is not None and entry.expires_at > self._clock() else None

    def ids(self) -> list[str]:
        """Ids of the live records."""
        now = self._clock()
        return [s for s, e in self._entries.items() if e.expires_at > now]

    def __contains__(self, server_id: str) -> bool:
        entry = self._entries.get(server_id)
        return entry is not None and entry.expires_at > self._clock()

    def servers(self, model: str | None = None) -> list[ServerInfo]:
        """Every live record (any state) of `model` (a fingerprint; None: all), by server_id."""
        now = self._clock()
        for server_id in [s for s, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[server_id]
        return [e.info for _, e in sorted(self._entries.items()) if model is None or e.info.model == model]


def coverage(servers: list[ServerInfo], num_layers: int) -> list[int]:
    """How many servers cover each layer."""
    counts = [0] * num_layers
    for s in servers:
        for layer in range(max(0, s.start), min(num_layers, s.end)):
            counts[layer] += 1
    return counts
