"""Loading what each side needs of a model: a span of layers (blockserver), the ends and the
tokenizer (gateway), and the facts both need (`ModelFacts`). Only the tensors asked for are read;
the rest is never materialized."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.dtypes import resolve_dtype
from shared.errors import BadRequest, UnsupportedModel
from shared.models.base import Family, LoadedSpan, ModelEnds, build_skeleton, materialize
from shared.models.checkpoint import Checkpoint
from shared.models.families.bloom import BloomFamily
from shared.models.families.falcon import FalconFamily
from shared.models.families.gemma import GemmaFamily
from shared.models.families.llama import LlamaFamily
from shared.models.families.mixtral import MixtralFamily, Qwen3MoeFamily
from shared.models.fingerprint import model_fingerprint
from shared.models.quant import check_quant, module_bytes, quantize_layer
from shared.models.rows import make_tiled

log = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = (LlamaFamily(), MixtralFamily(), Qwen3MoeFamily(), GemmaFamily(), BloomFamily(),
                                FalconFamily())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


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


@dataclass(frozen=True)
class ModelFacts:
    """What gateways and blockservers need to know about a model, read from its directory."""

    directory: Path
    fingerprint: str  # what the swarm matches on (shared/models/fingerprint.py)
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    config: object  # the transformers config, for the adapters

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of KV cache one token takes in one layer, in `dtype`."""
        return family_for(self.config).kv_bytes_per_token(self.config, dtype)


def load_facts(model_dir: Path) -> ModelFacts:
    config = load_config(model_dir)
    family = family_for(config)
    return ModelFacts(directory=Path(model_dir), fingerprint=model_fingerprint(model_dir),
                      model_type=config.model_type, num_layers=num_layers(config), hidden_size=config.hidden_size,
                      vocab_size=config.vocab_size, context_length=family.context_length(config), config=config)


def load_span(model_dir: Path, start: int, end: int, device: str | torch.device = "cpu",
              dtype: str = "auto", progress=None, quant: str = "none") -> LoadedSpan:
    """Load layers [start, end) of the model in `model_dir`, their Linear weights quantized as
    `quant` says (shared/models/quant.py).

    `progress(done, total)` is called after each layer (for loading bars)."""
    check_quant(quant, device)
    config = load_config(model_dir)
    family = family_for(config)
    n = num_layers(config)
    if not 0 <= start < end <= n:
        raise BadRequest(f"span [{start}, {end}) is not within the model's {n} layers")
    torch_dtype = resolve_dtype(dtype, config, device)
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
        if quant == "none":
            loaded += materialize(layer, tensors, device, torch_dtype, f"layer {index}")
        else:  # quantized on the CPU, one layer at a time, then moved
            loaded += materialize(layer, tensors, "cpu", torch_dtype, f"layer {index}")
            quantize_layer(layer, quant, device, torch_dtype)
        make_tiled(layer).eval()
        layers.append(layer)
        if progress is not None:
            progress(index - start + 1, end - start)
    checkpoint.close()
    rotary = family.rotary(skeleton, config, device)
    del skeleton, all_layers
    log.info("loaded layers [%d, %d) of %s (%s, %s, quant %s) in %.1fs", start, end, model_dir, torch_dtype, device,
             quant, time.monotonic() - started)
    return LoadedSpan(family, config, start, end, layers, rotary, device, torch_dtype, loaded, quant)


def random_layer(config, device: str | torch.device, dtype: torch.dtype, quant: str = "none") -> LoadedSpan:
    """A one-layer span of layer 0's shape with random weights: the throughput probe's subject."""
    family = family_for(config)
    skeleton = build_skeleton(config)
    layer = skeleton.get_submodule(family.layers_path)[0]
    layer.to_empty(device="cpu")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer = make_tiled(quantize_layer(layer.to(dtype), quant, device, dtype)).eval().requires_grad_(False)
    return LoadedSpan(family, skeleton.config, 0, 1, torch.nn.ModuleList([layer]),
                      family.rotary(skeleton, skeleton.config, device), torch.device(device), dtype, 0, quant)


def layer_bytes(config, dtype: torch.dtype, quant: str = "none") -> int:
    """Bytes of one decoder layer's weights in `dtype` and quantization `quant` (from the config;
    nothing is allocated)."""
    return module_bytes(build_skeleton(config).get_submodule(family_for(config).layers_path)[0], quant, dtype)


def load_ends(model_dir: Path, device: str | torch.device = "cpu", dtype: str = "auto") -> ModelEnds:
    """Load the embeddings, final norm and LM head (tied to the embeddings if the config says so)."""
    config = load_config(model_dir)
    family = family_for(config)
    torch_dtype = resolve_dtype(dtype, config, device)
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
    make_tiled(modules["head"])
    return ModelEnds(family, skeleton.config, modules).eval()


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or None for checkpoints that ship none (tiny test models, bare layers)."""
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def eos_ids(model_dir: Path, config, tokenizer) -> frozenset[int]:
    """Every token that ends a generation: the generation config's, the config's and the tokenizer's."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        value = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        value = getattr(config, "eos_token_id", None)
    if value is not None:
        ids.update(value if isinstance(value, list) else [value])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
