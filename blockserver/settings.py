"""Settings of a blockserver, built once in __main__ (env prefix COROLLA_BLOCKSERVER_)."""

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BlockserverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COROLLA_BLOCKSERVER_")

    model: str | None = None  # reference: directory, hub id, or None/'smollm2'
    model_name: str | None = None  # name announced to gateways (defaults to the model's served name)
    blocks: str | None = None  # START:END; None: choose a span from the swarm (and rebalance)
    num_blocks: int | None = Field(default=None, ge=1)  # with no --blocks; None: as many as fit in memory
    max_memory_gib: float | None = Field(default=None, gt=0)  # for weights + cache; None: half the free memory
    throughput: float | None = Field(default=None, ge=0)  # announced tokens/s; None: measured (cached)
    balance_period_s: float = Field(default=60.0, gt=0)  # rebalancing checks every U(0, 2 x period)
    balance_quality: float = Field(default=0.75, gt=0)  # move when current/new weakest layer < this
    join_delay_s: float = Field(default=2.0, ge=0)  # random wait before choosing a span
    swarm_secret: str | None = None  # sent with every registry request
    gateways: list[str] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    public_url: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    cache_tokens: int = Field(default=16384, ge=1)  # KV-cache budget: batch x tokens held at once
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    idle_timeout_s: float = Field(default=300.0, gt=0)  # a session with no message for this long is freed
    alloc_timeout_s: float = Field(default=5.0, ge=0)  # how long `open` waits for cache room
    prefill_chunk_tokens: int = Field(default=512, ge=1)  # long steps run in chunks of this many tokens
    max_frame_bytes: int = Field(default=64 * 2**20, ge=1024)
    num_threads: int | None = None  # torch threads of the compute thread (default: torch's choice)
    cache_dir: str | None = None
    server_id: str | None = None

    @field_validator("gateways")
    @classmethod
    def _strip(cls, urls: list[str]) -> list[str]:
        return [u.rstrip("/") for u in urls]
