"""Shared fixtures: tiny random models of every family, saved once per test session."""

from pathlib import Path

import pytest

from tests import tiny


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
