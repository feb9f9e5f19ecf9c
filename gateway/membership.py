"""Who may join this gateway's swarm, and what it grants them.

A heartbeat is admitted when its envelope verifies (shared/identity.py), its record's id is the
id of the key that signed it, its time stamp is newer than the last one taken from that id, its
record fits the model, its source address holds fewer than `max_per_source` live records and the
registry fewer than `max_servers`. The
gateway signs a grant for every session it opens on a blockserver (and for stateless passes), and
blockservers serve nothing else."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from urllib.parse import urlparse

from pydantic import ValidationError

from gateway.registry import Registry
from shared.identity import (
    GRANT,
    HEARTBEAT,
    MAX_SKEW_S,
    STATELESS,
    AuthError,
    Identity,
    Signed,
    check_read_token,
    verify,
)
from shared.records import ServerInfo

RESOLVED_S = 60.0  # how long a host name's addresses are kept


def _same(source: str, addresses: set[str]) -> bool:
    """Whether `source` is one of `addresses` (IPv4-mapped IPv6 read as IPv4; loopback is one host)."""
    def normal(text: str):
        try:
            address = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped
        return address
    origin = normal(source)
    if origin is None:
        return False
    for candidate in filter(None, map(normal, addresses)):
        if candidate == origin or (candidate.is_loopback and origin.is_loopback):
            return True
    return False


class Refused(Exception):
    """A heartbeat not admitted: the HTTP status and the reason."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Membership:
    def __init__(self, identity: Identity, secret: str | None, max_per_source: int, max_servers: int = 1024,
                 clock=time.time):
        self.identity, self.secret, self.max_per_source = identity, secret, max_per_source
        self.max_servers = max_servers
        self._clock = clock
        self._last: dict[str, float] = {}  # server id -> newest time stamp taken (kept past the record)
        self._source: dict[str, str] = {}  # server id -> address its heartbeats came from
        self._resolved: dict[str, tuple[float, set[str]]] = {}  # host name -> (when, its addresses)

    def admit(self, envelope: object, source: str, registry: Registry, num_layers: int | None) -> ServerInfo:
        """The record of a heartbeat that may be taken, or Refused."""
        try:
            signed: Signed = verify(envelope, HEARTBEAT, self.secret, now=self._clock())
        except AuthError as exc:
            raise Refused(403, str(exc), "unauthenticated") from None
        try:
            info = ServerInfo.model_validate(signed.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise Refused(400, f"invalid record: {first.get('msg')} (at {where})", "bad_record") from None
        if info.server_id != signed.signer:
            raise Refused(403, f"a record's server_id must be its key's id {signed.signer}, not {info.server_id}",
                          "unauthenticated")
        if signed.time <= self._last.get(info.server_id, float("-inf")):
            raise Refused(403, "a heartbeat older than one already taken (replayed?)", "replayed")
        if num_layers is not None and info.end > num_layers:
            raise Refused(400, f"span {info.start}:{info.end} ends past the model's {num_layers} layers", "bad_record")
        if info.server_id not in registry:  # a newcomer: count what is there (a renewal costs nothing)
            live = registry.ids()
            if len(live) >= self.max_servers:
                raise Refused(429, f"this swarm's registry is full ({len(live)} servers; gateway --max-servers)",
                              "too_many_servers")
            from_source = sum(1 for i in live if self._source.get(i) == source)
            if from_source >= self.max_per_source:
                raise Refused(429, f"{source} already has {from_source} servers in this swarm (the most one address "
                                   f"may have; gateway --max-servers-per-source)", "too_many_servers")
        self._forget_old()
        self._last[info.server_id] = signed.time
        self._source[info.server_id] = source
        return info

    def _forget_old(self) -> None:
        """Time stamps older than the skew window cannot be replayed anyway."""
        if len(self._last) > 4 * max(64, self.max_per_source):
            horizon = self._clock() - 2 * MAX_SKEW_S
            for server_id in [i for i, t in self._last.items() if t < horizon]:
                del self._last[server_id]
                self._source.pop(server_id, None)

    # ---- where a record points
    async def check_url(self, info: ServerInfo, source: str) -> None:
        """Refuse a record whose URL does not lead to the address its heartbeat came from: the
        gateway connects to record URLs (pings, sessions), and must not be made to reach other
        hosts for whoever can sign a heartbeat. Loopback addresses are one host."""
        host = urlparse(info.url).hostname or ""
        if _same(source, await self._addresses(host)):
            return
        raise Refused(403, f"a record's URL must lead to the address its heartbeats come from ({source}), not "
                           f"{host} (gateway --allow-foreign-urls accepts it: a blockserver behind a proxy on "
                           f"another machine)", "foreign_url")

    async def _addresses(self, host: str) -> set[str]:
        try:
            return {str(ipaddress.ip_address(host))}
        except ValueError:
            pass
        kept = self._resolved.get(host)
        if kept is not None and self._clock() - kept[0] < RESOLVED_S:
            return kept[1]
        try:
            found = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, None), 2.0)
            addresses = {info[4][0] for info in found}
        except (OSError, TimeoutError):
            addresses = set()
        if len(self._resolved) > 4096:
            self._resolved.clear()
        self._resolved[host] = (self._clock(), addresses)
        return addresses

    # ---- registry reads
    def check_read(self, token: str | None) -> None:
        try:
            check_read_token(self.secret, token, self._clock())
        except AuthError as exc:
            raise Refused(403, str(exc), "bad_swarm_secret") from None

    # ---- grants
    def grant(self, server_id: str, session_id: str = STATELESS) -> dict:
        return self.identity.sign(GRANT, {"server": server_id, "session": session_id}, now=self._clock())

