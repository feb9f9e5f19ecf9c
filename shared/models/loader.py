"""Loading what each side needs of a model: a span of layers (blockserver), the ends and the
tokenizer (gateway). Only the tensors asked for are read; the rest is never materialized."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from shared.errors import BadRequest, UnsupportedModel
from shared.models.base import Family, LoadedSpan, ModelEnds, build_skeleton, materialize, resolve_dtype
from shared.models.bloom import BloomFamily
from shared.models.checkpoint import Checkpoint
from shared.models.falcon import FalconFamily
from shared.models.llama import LlamaFamily
from shared.models.mixtral import MixtralFamily

log = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = (LlamaFamily(), MixtralFamily(), BloomFamily(), FalconFamily())


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def load_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def family_for(config) -> Family:
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    raise UnsupportedModel(
        f"architecture {config.model_type!r} is not supported; supported: {', '.join(supported_model_types())}")


def num_layers(config) -> int:
    return config.num_hidden_layers


def load_span(model_dir: Path, start: int, end: int, device: str | torch.device = "cpu",
              dtype: str = "auto", progress=None) -> LoadedSpan:
    """Load layers [start, end) of the model in `model_dir`.

    `progress(done, total)` is called after each layer (for loading bars)."""
    config = load_config(model_dir)
    family = family_for(config)
    n = num_layers(config)
    if not 0 <= start < end <= n:
        raise BadRequest(f"span [{start}, {end}) is not within the model's {n} layers")
    torch_dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    started = time.monotonic()
    skeleton = build_skeleton(config)
    config = skeleton.config  # carries the attention implementation chosen for this machine
    all_layers = skeleton.get_submodule(family.layers_path)
    checkpoint = Checkpoint(model_dir)
    layers = torch.nn.ModuleList()
    loaded = 0
    for index in range(start, end):
        layer = all_layers[index]
        names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
        tensors = family.layer_tensors(checkpoint, index, names)
        loaded += materialize(layer, tensors, device, torch_dtype, f"layer {index}")
        layer.eval()
        layers.append(layer)
        if progress is not None:
            progress(index - start + 1, end - start)
    checkpoint.close()
    rotary = family.rotary(skeleton, config, device)
    del skeleton, all_layers
    log.info("loaded layers [%d, %d) of %s (%s, %s) in %.1fs", start, end, model_dir, torch_dtype, device,
             time.monotonic() - started)
    return LoadedSpan(family, config, start, end, layers, rotary, device, torch_dtype, loaded)


def load_ends(model_dir: Path, device: str | torch.device = "cpu", dtype: str = "auto") -> ModelEnds:
    """Load the embeddings, final norm and LM head (tied to the embeddings if the config says so)."""
    config = load_config(model_dir)
    family = family_for(config)
    torch_dtype = resolve_dtype(dtype, config)
    skeleton = build_skeleton(config)
    modules = family.end_modules(skeleton)
    names = {id(m): name for name, m in skeleton.named_modules()}
    checkpoint = Checkpoint(model_dir)
    for role, module in modules.items():
        prefix = names[id(module)] + "."
        wanted = [n for n, _ in module.named_parameters()]
        tensors = {n: checkpoint.read(prefix + n) for n in wanted if prefix + n in checkpoint}
        if role == "head" and not tensors and getattr(config, "tie_word_embeddings", False):
            continue  # tied below
        materialize(module, tensors, device, torch_dtype, f"the model's {role}")
    if modules["head"].weight.is_meta:
        if not getattr(config, "tie_word_embeddings", False):
            raise BadRequest("checkpoint has no LM head and the config does not tie it to the embeddings")
        modules["head"].weight = modules["embed"].weight
    checkpoint.close()
    ends = ModelEnds(family, skeleton.config, modules).eval()
    return ends


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
