"""The common interface of model adapters: load a span of layers, run steps with a cache, build ends.

A `Family` knows one architecture family's quirks (where its layers live, how masks, positions
and alibi are built, what the layer returns); `LoadedSpan` and `ModelEnds` are the same for all.
Layer modules are the real `transformers` classes, built on the meta device from the config and
filled with only the tensors of their layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from shared.errors import BadRequest
from shared.models.cache import SpanCache
from shared.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(name: str, config) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float32 if it names none)."""
    if name == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype)
        return dtype if dtype in DTYPE_NAMES else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise BadRequest(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}") from None


@dataclass
class StepInputs:
    """What every layer of a span needs for one step, built once per step."""

    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window
    position_ids: torch.Tensor | None = None  # [batch, tokens]
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    alibi: torch.Tensor | None = None


class Family:
    """One architecture family. Subclasses override what differs."""

    name = "base"
    model_types: tuple[str, ...] = ()
    layers_path = "model.layers"  # module path of the layer list, also the checkpoint prefix
    base_path = "model"  # the decoder (holds norm / rotary) inside the *ForCausalLM
    final_norm = "norm"

    # ---- loading
    def layer_tensors(self, checkpoint: Checkpoint, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of layer `index`, keyed by the module's parameter names."""
        prefix = f"{self.layers_path}.{index}."
        return {n: checkpoint.read(prefix + n) for n in names if prefix + n in checkpoint}

    def rotary(self, skeleton: nn.Module, config, device) -> nn.Module | None:
        module = getattr(skeleton.get_submodule(self.base_path), "rotary_emb", None)
        if module is None:
            return None
        # Built on the real device: its inverse frequencies are computed, not loaded.
        with torch.device(device):
            return type(module)(config=config)

    def window(self, config, index: int) -> int | None:
        """The sliding window of layer `index`, or None for full attention."""
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if layer_types is not None:
            return window if layer_types[index] == "sliding_attention" else None
        return window

    # ---- one step
    def prepare(self, span: LoadedSpan, hidden: torch.Tensor, full_mask: torch.Tensor) -> StepInputs:
        raise NotImplementedError

    def run_layer(self, span: LoadedSpan, layer: nn.Module, index: int, hidden: torch.Tensor,
                  inputs: StepInputs, cache: SpanCache) -> torch.Tensor:
        raise NotImplementedError

    # ---- gateway ends
    def end_modules(self, skeleton: nn.Module) -> dict[str, nn.Module]:
        base = skeleton.get_submodule(self.base_path)
        return {"embed": skeleton.get_input_embeddings(), "norm": getattr(base, self.final_norm),
                "head": skeleton.get_output_embeddings()}


def build_skeleton(config) -> nn.Module:
    """The whole *ForCausalLM on the meta device: structure only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype,
                what: str) -> int:
    """Replace a meta module's parameters and buffers by `tensors`; return the number of values loaded."""
    expected = dict(module.named_parameters()) | dict(module.named_buffers())
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise BadRequest(f"checkpoint lacks tensors of {what}: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    loaded = 0
    for name, tensor in tensors.items():
        if name not in expected:
            continue
        if tensor.shape != expected[name].shape:
            raise BadRequest(f"{what}: {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"{tuple(expected[name].shape)} in the config")
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
        loaded += value.numel()
    return loaded


class LoadedSpan:
    """Layers [start, end) of one model, on one device, in one dtype, ready to run steps."""

    def __init__(self, family: Family, config, start: int, end: int, layers: nn.ModuleList,
                 rotary: nn.Module | None, device: torch.device, dtype: torch.dtype, loaded_values: int):
        self.family, self.config = family, config
        self.start, self.end = start, end
        self.layers, self.rotary = layers, rotary
        self.device, self.dtype = device, dtype
        self.loaded_values = loaded_values  # parameters actually read from the checkpoint
        self.windows = [family.window(config, i) for i in range(start, end)]
        self.hidden_size = config.hidden_size

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        return SpanCache(batch_size, max_length, self.device)

    @torch.inference_mode()
    def step(self, hidden: torch.Tensor, cache: SpanCache, new_mask: torch.Tensor | None = None,
             start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Run new tokens through layers [start, end) of the span (default: all of it).
        hidden: [batch, tokens, hidden] -> same shape.

        new_mask [batch, tokens] marks padding (0) among the new tokens; None means none."""
        first = (self.start if start is None else start) - self.start
        last = (self.end if end is None else end) - self.start
        if hidden.dim() != 3 or hidden.shape[0] != cache.batch_size or hidden.shape[2] != self.hidden_size:
            raise BadRequest(f"hidden must be [{cache.batch_size}, tokens, {self.hidden_size}], "
                             f"got {list(hidden.shape)}")
        hidden = hidden.to(self.device, self.dtype)
        full_mask = cache.begin_step(new_mask, hidden.shape[1])
        try:
            inputs = self.family.prepare(self, hidden, full_mask)
            for offset in range(first, last):
                hidden = self.family.run_layer(self, self.layers[offset], self.start + offset, hidden, inputs, cache)
        except BaseException:
            cache.abort_step()
            raise
        cache.commit_step()
        return hidden

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stateless pass over whole sequences (scoring, fine-tuning): no cache is kept."""
        cache = self.new_cache(hidden.shape[0], hidden.shape[1])
        return self.step(hidden, cache, mask)


class ModelEnds(nn.Module):
    """The gateway's ends of a model: embeddings in, final norm + LM head (+ softcap) out."""

    def __init__(self, family: Family, config, modules: dict[str, nn.Module]):
        super().__init__()
        self.family, self.config = family, config
        self.embed = modules["embed"]
        self.embed_norm = modules.get("embed_norm")
        self.norm = modules["norm"]
        self.head = modules["head"]
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @torch.inference_mode()
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] -> [batch, tokens, hidden]"""
        hidden = self.embed(input_ids)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] -> [batch, tokens, vocab] in float32."""
        hidden = hidden.to(self.head.weight.dtype)
        logits = self.head(self.norm(hidden)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

