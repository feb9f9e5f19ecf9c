"""Reading a model's tensors by name from single-file or sharded safetensors checkpoints.

Tensors are memory-mapped by `safe_open`; only the tensors asked for are ever read.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shared.errors import ModelNotFound

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The safetensors files of one model directory, indexed by tensor name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._file_of: dict[str, str] = {}
        index = self.directory / INDEX_FILE
        if index.is_file():
            self._file_of = dict(json.loads(index.read_text())["weight_map"])
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                self._file_of = {name: SINGLE_FILE for name in f.keys()}
        else:
            found = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
            raise ModelNotFound(
                f"no safetensors checkpoint in {self.directory} (looked for {SINGLE_FILE} and "
                f"{INDEX_FILE}; found {found}). Pickle checkpoints (*.bin) are refused: convert them "
                f"with `save_pretrained(..., safe_serialization=True)`."
            )
        self._open: dict[str, object] = {}

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._file_of if n.startswith(prefix))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def files_for(self, names: list[str]) -> set[str]:
        return {self._file_of[n] for n in names}

    def read(self, name: str) -> torch.Tensor:
        filename = self._file_of[name]
        handle = self._open.get(filename)
        if handle is None:
            handle = safe_open(self.directory / filename, framework="pt")
            self._open[filename] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        self._open.clear()
