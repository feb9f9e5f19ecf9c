"""Settings of a blockserver, built once in __main__ (env prefix COROLLA_BLOCKSERVER_). Each
field's description is its `--help` text (shared/flags.py)."""

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.dtypes import DtypeChoice
from shared.models.quant import QuantMode
from shared.records import Span


class BlockserverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COROLLA_BLOCKSERVER_")

    model: str | None = Field(None, description="model directory, hub id, or 'smollm2' (default: "
                                                "SmolLM2-135M-Instruct)")
    model_name: str | None = Field(None, description="a readable name shown in the swarm's views (default: derived "
                                                     "from --model); gateways match the model by its fingerprint")
    blocks: Span | None = Field(None, json_schema_extra={"metavar": "START:END"},
                                description="layers to serve, half-open, e.g. 0:10 (default: choose them from the "
                                            "swarm, and move when the swarm would be faster)")
    num_blocks: int | None = Field(None, ge=1, description="without --blocks: how many layers to serve (default: as "
                                                           "many as fit in --max-memory)")
    max_memory_gib: float | None = Field(None, gt=0, json_schema_extra={"flag": "max-memory", "metavar": "GIB"},
                                         description="memory for weights and KV cache, to size --num-blocks "
                                                     "(default: half the available memory)")
    throughput: float | None = Field(None, ge=0, description="tokens/s to announce (default: measured once per "
                                                             "model, device and dtype, then cached)")
    balance_period_s: float = Field(60.0, gt=0, description="mean seconds between rebalancing checks")
    balance_quality: float = Field(0.75, gt=0, description="move when the swarm's weakest layer would grow by "
                                                           "more than 1/this")
    join_delay_s: float = Field(2.0, ge=0, description="wait up to this long (at random) before choosing a span")
    swarm_secret: str | None = Field(None, description="the swarm's join secret, required by gateways started "
                                                       "with one")
    gateways: list[str] = Field(default_factory=list, json_schema_extra={"flag": "gateway", "metavar": "URL"},
                                description="a gateway to heartbeat to, e.g. http://10.0.0.2:8000")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all)")
    port: int = Field(0, ge=0, le=65535, description="port to listen on (0: a free port)")
    public_url: str | None = Field(None, description="address gateways should connect to, when it differs from "
                                                     "where this server listens (NAT, containers), e.g. "
                                                     "http://myhost:31330")
    dtype: DtypeChoice = Field("auto", description="compute dtype ('auto': bfloat16 on GPUs and on CPUs with native "
                                                   "bfloat16 (AVX512-BF16, AMX), else float32; a float16 or "
                                                   "bfloat16 checkpoint keeps its own where the device runs it)")
    batch_invariant: bool = Field(True, description="on by default: batch-invariant steps, a session's results are the same bit "
                                                    "for bit whatever else shares its batch (greedy answers do not "
                                                    "change with load); off: a little more throughput at high "
                                                    "concurrency")
    compile: bool = Field(True, description="on by default: compile the decode step (torch.compile, Inductor's C++ "
                                            "kernels on frozen weights) at start, about 4x faster for one "
                                            "stream on CPU; it takes a minute or two per start, and memory for "
                                            "prepacked weights (about 3x the span's weights, counted by "
                                            "--max-memory). Llama-family models, unquantized, on CPU; "
                                            "elsewhere steps run eagerly")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 …")
    quant: QuantMode = Field("none", description="store the layers' weights quantized: int8 (CPU: weight-only int8, "
                                                 "half of bf16's memory, faster; CUDA: bitsandbytes LLM.int8), int4 (CPU: weight-only "
                                                 "4-bit groups, torch's int4 kernel, the fastest decode on CPU) or "
                                                 "nf4 (bitsandbytes 4-bit NormalFloat, a quarter of bf16's memory; "
                                                 "slower than bf16 on CPU). Activations and the KV cache keep --dtype")
    cache_tokens: int = Field(16384, ge=1, description="KV-cache budget in tokens (batch x length summed over "
                                                       "open sessions)")
    cache_page_tokens: int = Field(128, ge=1, description="sessions take cache room in pages of this many tokens "
                                                          "as they grow (not their whole max_length at once)")
    batch_linger_s: float = Field(0.01, ge=0, le=1, description="a decode tick may wait this long for the steps "
                                                              "of sessions that are one hop away, so they share it")
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60, description="seconds between heartbeats; a record expires "
                                                               "after 3")
    idle_timeout_s: float = Field(300.0, gt=0, description="free a session after this long without a message")
    alloc_timeout_s: float = Field(5.0, ge=0, description="how long an open or a growing session waits for cache "
                                                          "room before it is refused with cache_full")
    prefill_chunk_tokens: int = Field(512, ge=1, json_schema_extra={"flag": "prefill-chunk", "metavar": "TOKENS"},
                                      description="run longer steps (prompts, failover replays) in chunks of this "
                                                  "many tokens")
    max_frame_bytes: int = Field(64 * 2**20, ge=1024, description="largest WebSocket frame to accept")
    max_connections: int = Field(256, ge=1, description="open connections (gateways' sessions, pings) at once; "
                                                        "beyond it new ones get 503")
    ssl_certfile: str | None = Field(None, description="serve https (and wss) with this PEM certificate; peers "
                                                       "trust it through the system's CAs or SSL_CERT_FILE")
    ssl_keyfile: str | None = Field(None, description="the certificate's PEM private key")
    num_threads: int | None = Field(None, ge=1, description="torch threads for compute (default: all cores)")
    cache_dir: str | None = Field(None, description="where converted models are kept (default ~/.cache/corolla)")
    identity_file: str | None = Field(None, description="this server's Ed25519 key (created there if missing): its "
                                                        "id in the swarm is derived from it, so keeping the file keeps "
                                                        "the id across restarts (default: a new key each start)")
    max_sessions_per_peer: int = Field(512, ge=1, description="open sessions one address may hold here")
    server_id: str | None = Field(None, json_schema_extra={"flag": False},
                                  description="tests only: an id not derived from the key (gateways refuse it)")

    @field_validator("blocks", mode="before")
    @classmethod
    def _parse_blocks(cls, value):
        return Span.parse(value) if isinstance(value, str) else value

    @field_validator("gateways")
    @classmethod
    def _strip(cls, urls: list[str]) -> list[str]:
        return [u.rstrip("/") for u in urls]
