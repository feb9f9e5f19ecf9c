"""Shared fixtures: tiny random models of every family, saved once per test session."""

import os
from pathlib import Path

import pytest
import torch

from tests import tiny

# Blockservers and gateways started by tests (in process or as processes, which inherit this) run eagerly: compiling
# takes tens of seconds per server. The tests of the compiled path turn it on themselves.
os.environ.setdefault("COROLLA_BLOCKSERVER_COMPILE", "false")
os.environ.setdefault("COROLLA_GATEWAY_COMPILE", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(name, sharded=False) -> directory of that tiny model's checkpoint (built once)."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[str, bool], Path] = {}

    def get(name: str, sharded: bool = False) -> Path:
        key = (name, sharded)
        if key not in built:
            directory = root / (name + ("-sharded" if sharded else ""))
            built[key] = tiny.save_model(name, directory, max_shard_size="40KB" if sharded else None)
        return built[key]

    return get


@pytest.fixture(scope="session")
def smollm2_shaped(tmp_path_factory):
    """A random 2-layer model of SmolLM2's layer shape: wide enough that GEMM blocking changes
    with the number of rows (the tiny models' 64-wide products come out the same anyway)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
    directory = tmp_path_factory.mktemp("smollm2-shaped")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory
