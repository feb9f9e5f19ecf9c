"""What a model *is*, as a short id: the swarm matches models by it, never by a path or a name.

The fingerprint hashes the config (without bookkeeping keys such as the transformers version)
and the checkpoint's layout: every tensor's name, dtype and shape from the safetensors headers,
plus a few hundred bytes sampled from the start, middle and end of each tensor's data, so that two
fine-tunes of one base model differ. It reads kilobytes, not the weights: a 100 GB checkpoint of
a thousand tensors costs a few thousand small reads. Sharded and single-file copies of the same
tensors fingerprint alike."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from shared.errors import ModelNotFound
from shared.models.checkpoint import INDEX_FILE, SINGLE_FILE, safe_member

# Keys that say how a file was written, not what the model computes.
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
})
SAMPLE_BYTES = 256
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def model_fingerprint(directory: Path) -> str:
    """A 20-hex-digit id of the model in `directory` (config + checkpoint layout + sampled bytes)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    config = json.loads((directory / "config.json").read_text())
    canonical = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    for name, entry, path, data_start in sorted(_tensors(directory), key=lambda t: t[0]):
        begin, end = entry["data_offsets"]
        digest.update(f"\n{name}|{entry['dtype']}|{entry['shape']}|".encode())
        with open(path, "rb") as f:
            for at in sorted({begin, begin + (end - begin) // 2, max(begin, end - SAMPLE_BYTES)}):
                f.seek(data_start + at)
                digest.update(f.read(min(SAMPLE_BYTES, end - at)))
    return digest.hexdigest()[:20]


def _tensors(directory: Path):
    """(name, header entry, file, offset of the data section) of every tensor of the checkpoint."""
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ModelNotFound(f"no safetensors checkpoint in {directory}")
    for filename in files:
        path = safe_member(directory, filename)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ModelNotFound(f"{path}: safetensors header of {length} bytes is not plausible")
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                yield name, entry, path, 8 + length
