"""Reading a model's tensors by name from single-file or sharded safetensors checkpoints.

Tensors are memory-mapped by `safe_open`; only the tensors asked for are ever read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shared.errors import ModelNotFound

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safe_member(directory: Path, filename: str) -> Path:
    """`directory / filename`, refusing names that would leave the directory (an index file is
    data from the model's author: absolute paths or '..' must not reach other files)."""
    path = (Path(directory) / filename).resolve()
    if not isinstance(filename, str) or Path(filename).is_absolute() or not path.is_relative_to(
            Path(directory).resolve()):
        raise ModelNotFound(f"checkpoint file {filename!r} is outside the model directory {directory}")
    return path


class Checkpoint:
    """The safetensors files of one model directory, indexed by tensor name."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._file_of: dict[str, Path] = {}
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: safe_member(self.directory, f) for name, f in weight_map.items()}
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                self._file_of = {name: self.directory / SINGLE_FILE for name in f.keys()}
        else:
            found = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
            raise ModelNotFound(
                f"no safetensors checkpoint in {self.directory} (looked for {SINGLE_FILE} and "
                f"{INDEX_FILE}; found {found}). Pickle checkpoints (*.bin) are refused: convert them "
                f"with `save_pretrained(..., safe_serialization=True)`."
            )
        self._open: dict[Path, object] = {}

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._file_of if n.startswith(prefix))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        handle = self._open.get(path)
        if handle is None:
            handle = safe_open(path, framework="pt")
            self._open[path] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        self._open.clear()
