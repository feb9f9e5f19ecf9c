"""Settings of a gateway, built once in __main__ (env prefix COROLLA_GATEWAY_)."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COROLLA_GATEWAY_")

    model: str | None = None  # reference: directory, hub id, or None/'smollm2'
    model_name: str | None = None  # the API's model id (defaults to the model's served name)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    dtype: str = "float32"  # of the gateway's ends (embeddings, norm, head)
    cache_dir: str | None = None
    num_threads: int | None = None  # torch threads of the compute thread (default: torch's choice)
    step_timeout_s: float = Field(default=30.0, gt=0)  # a hop with no reply for this long has failed
    connect_timeout_s: float = Field(default=10.0, gt=0)
    failover_timeout_s: float = Field(default=30.0, ge=0)  # to find and rebuild a replacement for a failed hop
    failover: bool = True  # off: a failed hop fails the request (the baseline of bench/failover.py)
    ban_s: float = Field(default=15.0, gt=0)  # a failed server is not routed to for this long (doubling on repeats)
    max_batch_rows: int = Field(default=64, ge=1)  # prompts x n per request
    max_frame_bytes: int = Field(default=64 * 2**20, ge=1024)
    swarm_secret: str | None = None  # required of blockservers' registry requests when set
    ping_interval_s: float = Field(default=5.0, gt=0)  # how often the gateway measures its RTT to each server
    retry_after_s: int = Field(default=5, ge=1)
