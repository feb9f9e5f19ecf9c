"""Records both sides agree on: spans of layers and the server records of the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LAYERS = 10_000  # no model has more; bounds every span in a record
MAX_NEXT_PINGS = 64


@dataclass(frozen=True, order=True)
class Span:
    """Half-open range of layers [start, end), global 0-based indices."""

    start: int
    end: int

    def __post_init__(self):
        if not 0 <= self.start < self.end:
            raise ValueError(f"a span needs 0 <= start < end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer < self.end

    @classmethod
    def parse(cls, text: str) -> Span:
        """'START:END' as written on the command line."""
        try:
            start, end = (int(p) for p in text.split(":"))
        except ValueError:
            raise ValueError(f"a span is written START:END (e.g. 0:10), got {text!r}") from None
        return cls(start, end)


def even_spans(num_layers: int, parts: int) -> list[Span]:
    """Split [0, num_layers) into `parts` contiguous spans whose lengths differ by at most one."""
    if not 1 <= parts <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {parts} spans")
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [Span(a, b) for a, b in zip(bounds, bounds[1:])]


class ServerState(StrEnum):
    joining = "joining"  # counted for span choice, never routed to
    online = "online"
    offline = "offline"


Rate = Annotated[float, Field(ge=0, le=1e9)]  # per second; finite (see allow_inf_nan below)


class ServerInfo(BaseModel):
    """What a blockserver announces in every heartbeat (DESIGN.md section 6). Every field is
    bounded: a record is shown on pages, summed for span choice and used for routing."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    server_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    url: str = Field(min_length=1, max_length=512)  # http(s)://host:port the gateway connects to
    model: str = Field(min_length=1, max_length=128)  # the model's fingerprint: what the swarm matches on
    model_name: str = Field(default="", max_length=256)  # a readable name, for people only
    start: int = Field(ge=0, lt=MAX_LAYERS)
    end: int = Field(ge=1, le=MAX_LAYERS)
    state: ServerState = ServerState.online
    throughput: Rate = 1.0  # tokens/s the server can sustain (span choice)
    decode_tokens_per_s: Rate = 0.0  # decode tokens/s through one layer, one session (routing); 0: unknown
    batch_decode_tokens_per_s: Rate = 0.0  # the same with 16 sessions batched per tick; 0: unknown
    prefill_tokens_per_s: Rate = 0.0  # prefill tokens/s through one layer; 0: unknown
    network_tokens_per_s: Rate = 0.0  # hidden states/s the link carries; 0: unknown
    cache_tokens_left: int = Field(default=0, ge=0, le=2**40)
    cache_tokens: int = Field(default=0, ge=0, le=2**40)  # the whole KV budget; 0: unknown
    sessions: int = Field(default=0, ge=0, le=1_000_000)  # open inference sessions
    dtype: str = Field(default="float32", max_length=16)
    quant: str = Field(default="none", max_length=16)
    adapters: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=64)
    version: str = Field(default="", max_length=64)
    next_pings: dict[Annotated[str, Field(max_length=128)], Annotated[float, Field(ge=0, le=60)]] = Field(
        default_factory=dict)  # RTT (s) to servers that may follow
    public_name: str = Field(default="", max_length=128)
    ttl_s: float = Field(default=15.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("url must be http(s)://host[:port]")
        return url.rstrip("/")

    @field_validator("next_pings")
    @classmethod
    def _few_pings(cls, pings: dict[str, float]) -> dict[str, float]:
        if len(pings) > MAX_NEXT_PINGS:
            raise ValueError(f"at most {MAX_NEXT_PINGS} next_pings")
        return pings

    @model_validator(mode="after")
    def _ordered_span(self):
        if self.start >= self.end:
            raise ValueError(f"span needs start < end, got {self.start}:{self.end}")
        if not math.isfinite(self.ttl_s):
            raise ValueError("ttl_s must be finite")
        return self

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)


# The registry's HTTP contract (gateway routes that blockservers call).
HEARTBEAT_PATH = "/registry/heartbeat"  # POST a signed envelope of a ServerInfo (shared/identity.py)
SERVERS_PATH = "/registry/servers"  # GET the live records; with a secret, its token header
GRANT_PATH = "/registry/grant/{server_id}"  # GET a grant for stateless passes (fine-tuning clients)
