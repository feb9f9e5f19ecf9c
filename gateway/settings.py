"""Settings of a gateway, built once in __main__ (env prefix COROLLA_GATEWAY_). Each field's
description is its `--help` text (shared/flags.py)."""

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.dtypes import DtypeChoice


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COROLLA_GATEWAY_")

    model: str | None = Field(None, description="model directory, hub id, or 'smollm2' (default: SmolLM2-135M-Instruct)")
    model_name: str | None = Field(
        None, description="the model id the API shows, like vLLM's --served-model-name (default: derived from "
                          "--model); only an alias: blockservers are matched by the model's fingerprint")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(None, description="require this key as 'Authorization: Bearer KEY'")
    dtype: DtypeChoice = Field("auto", description="dtype of the gateway's embeddings and LM head ('auto': "
                                                   "bfloat16 on CPUs with native bfloat16, else float32)")
    batch_invariant: bool = Field(True, description="on by default: the LM head's rows in fixed tiles, so a "
                                                    "greedy answer does not change with what else shares the "
                                                    "head's batch; --no-batch-invariant for plain products")
    compile: bool = Field(True, description="on by default: compile the LM head for decode steps (torch.compile, "
                                            "Inductor's C++ kernels on frozen weights; about 2.5x faster than "
                                            "eager on CPU) at start, which takes some seconds")
    cache_dir: str | None = Field(None, description="where converted models are kept (default ~/.cache/corolla)")
    num_threads: int | None = Field(None, ge=1, description="torch threads for the ends (default: all cores)")
    step_timeout_s: float = Field(30.0, gt=0, description="a blockserver with no reply to a step for this long "
                                                          "has failed")
    connect_timeout_s: float = Field(10.0, gt=0, description="to open a session on a blockserver")
    failover_timeout_s: float = Field(30.0, ge=0, description="how long to look for a replacement when a "
                                                              "blockserver fails mid-generation")
    failover: bool = Field(True, description="replace a failed blockserver mid-generation (--no-failover fails the "
                                             "request instead, for comparisons)")
    ban_s: float = Field(15.0, gt=0, json_schema_extra={"flag": "ban", "metavar": "SECONDS"},
                         description="keep a failed blockserver out of routing this long, doubling on repeats")
    max_queue: int = Field(128, ge=0, description="requests that may wait for room on the swarm; more are refused "
                                                  "with 429 and Retry-After")
    queue_timeout_s: float = Field(60.0, ge=0, description="how long a request may wait for room before 429")
    stream_send_timeout_s: float = Field(60.0, gt=0, description="a streaming client that reads nothing for this "
                                                                 "long is dropped and its generation ended")
    step_chunk_tokens: int = Field(512, ge=1, description="long steps (prompts, failover replays) go to the "
                                                          "blockservers in frames of at most this many token-rows, "
                                                          "each under its own step timeout")
    wire_codec: Literal["raw", "dyn8"] = Field("raw", description="how hidden states cross the network: raw (exact) "
                                                                  "or dyn8 (8-bit blockwise, about half of bf16's "
                                                                  "bytes; logits move by a few percent of their range; "
                                                                  "never the KV cache nor gradients)")
    verify_rate: float = Field(0.0, ge=0, le=1, description="repeat this fraction of steps on another server of "
                                                           "the same layers and compare; a server whose results "
                                                           "disagree is banned (0: trust the swarm; bench/verify.py "
                                                           "measures the cost)")
    max_history_mib: float = Field(512.0, ge=0, description="input history a session keeps for failover; beyond "
                                                            "it a failed hop is repaired by recomputing the sequence")
    batch_linger_s: float = Field(0.01, ge=0, le=1, description="a sampling tick may wait this long for other "
                                                              "generations' last hidden states, so they share it")
    prompt_adapters: list[str] = Field(default_factory=list, json_schema_extra={"flag": "prompt-adapter",
                                                                                "metavar": "NAME=PATH"},
                                       description="serve a prompt trained with gateway.tuning as the model id NAME")
    generation_config: str = Field(
        "auto", description="where sampling defaults come from when a request omits them (temperature, top_p, "
                            "top_k), as vLLM's --generation-config: 'auto' reads the model's generation_config.json, "
                            "'none' uses OpenAI's defaults (1.0, 1.0, off), or a folder holding a "
                            "generation_config.json")
    max_batch_rows: int = Field(64, ge=1, description="prompts x n in one request")
    max_body_mib: float = Field(8.0, gt=0, description="largest request body; bigger ones get 413")
    max_connections: int = Field(1024, ge=1, description="open connections at once; beyond it requests get 503")
    ssl_certfile: str | None = Field(None, description="serve https (and wss) with this PEM certificate; peers "
                                                       "trust it through the system's CAs or SSL_CERT_FILE")
    ssl_keyfile: str | None = Field(None, description="the certificate's PEM private key")
    max_frame_bytes: int = Field(64 * 2**20, ge=1024, description="largest WebSocket frame to send or accept")
    swarm_secret: str | None = Field(None, description="the swarm's join secret: blockservers must prove they know it "
                                                       "(an HMAC of each heartbeat; the secret never crosses the network)")
    max_servers_per_source: int = Field(64, ge=1, description="live blockserver records one address may hold; more "
                                                             "are refused (a flood of fake servers)")
    allow_foreign_urls: bool = Field(False, description="accept blockserver records whose URL leads elsewhere than "
                                                        "the address their heartbeats come from (a blockserver behind "
                                                        "a proxy on another machine); off, the gateway never connects "
                                                        "to hosts a heartbeat did not come from")
    max_servers: int = Field(1024, ge=1, description="live blockserver records in all; more are refused (routing "
                                                     "stays a few milliseconds up to about this many)")
    identity_file: str | None = Field(None, description="this gateway's Ed25519 key, which signs the sessions it "
                                                        "grants (created there if missing; default: a new key each "
                                                        "start)")
    ping_interval_s: float = Field(5.0, gt=0, description="how often to measure the round trip to each "
                                                          "blockserver, for routing")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503s", json_schema_extra={"flag": False})
