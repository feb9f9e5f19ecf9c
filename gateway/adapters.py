"""Trained prompts served as models of their own: `--prompt-adapter NAME=PATH` makes NAME a model
id of the API; a request for it runs the base model with the soft prompt before its tokens and
the deep prompts added at those positions in every layer (gateway/tuning.py trains them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from shared.errors import BadRequest

ADAPTER_FORMAT = "corolla-prompt-v1"


@dataclass(frozen=True)
class PromptAdapter:
    name: str
    soft_prompt: torch.Tensor  # [P, hidden]
    deep_prompts: torch.Tensor | None  # [layers, P, hidden]

    @property
    def length(self) -> int:
        return self.soft_prompt.shape[0]


def parse_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise BadRequest(f"--prompt-adapter takes NAME=PATH, got {spec!r}")
    return name, Path(path).expanduser()


def load_adapter(spec: str, fingerprint: str, num_layers: int, hidden_size: int) -> PromptAdapter:
    """Read NAME=PATH; refuse a file made for another model or of the wrong shapes."""
    name, path = parse_spec(spec)
    if not path.is_file():
        raise BadRequest(f"prompt adapter {name}: no file at {path}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != ADAPTER_FORMAT:
            raise BadRequest(f"prompt adapter {name}: {path} is not a Corolla prompt file (format "
                             f"{meta.get('format')!r}; gateway.tuning.PromptTuning.save writes one)")
        if meta.get("fingerprint") != fingerprint:
            raise BadRequest(f"prompt adapter {name} was trained on the model with fingerprint "
                             f"{meta.get('fingerprint')} ({meta.get('model', '?')}), not this gateway's {fingerprint}")
        soft = f.get_tensor("soft_prompt").float()
        deep = f.get_tensor("deep_prompts").float() if "deep_prompts" in f.keys() else None
    if soft.dim() != 2 or soft.shape[1] != hidden_size:
        raise BadRequest(f"prompt adapter {name}: soft_prompt must be [tokens, {hidden_size}], got {list(soft.shape)}")
    if deep is not None and deep.shape != (num_layers, soft.shape[0], hidden_size):
        raise BadRequest(f"prompt adapter {name}: deep_prompts must be [{num_layers}, {soft.shape[0]}, "
                         f"{hidden_size}], got {list(deep.shape)}")
    return PromptAdapter(name, soft, deep)
