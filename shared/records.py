"""Records both sides agree on: spans of layers (and, with the registry, server records)."""

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


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

    @classmethod
    def parse(cls, text: str) -> "Span":
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


class ServerInfo(BaseModel):
    """What a blockserver announces in every heartbeat (DESIGN.md section 6)."""

    model_config = ConfigDict(extra="ignore")

    server_id: str = Field(min_length=1, max_length=128)
    url: str = Field(min_length=1, max_length=512)  # http(s)://host:port the gateway connects to
    model: str = Field(min_length=1, max_length=512)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    state: ServerState = ServerState.online
    throughput: float = Field(default=1.0, ge=0)  # tokens/s the server can sustain (span choice)
    inference_rps: float = Field(default=0.0, ge=0)  # decode tokens/s per layer (routing); 0: unknown
    forward_rps: float = Field(default=0.0, ge=0)  # prefill tokens/s per layer; 0: unknown
    network_rps: float = Field(default=0.0, ge=0)  # 0: unknown
    cache_tokens_left: int = Field(default=0, ge=0)
    sessions: int = Field(default=0, ge=0)  # open inference sessions
    dtype: str = "float32"
    quant: str = "none"
    adapters: list[str] = Field(default_factory=list)
    version: str = ""
    next_pings: dict[str, float] = Field(default_factory=dict)  # RTT (s) to servers that may follow
    public_name: str = ""
    ttl_s: float = Field(default=15.0, gt=0, le=3600)

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)
