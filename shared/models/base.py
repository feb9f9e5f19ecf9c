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

from shared.dtypes import dtype_name
from shared.errors import BadRequest
from shared.models.batch import ATTENTION, BatchView, pad_stack, register_attention
from shared.models.cache import SpanCache
from shared.models.checkpoint import Checkpoint
from shared.models.masks import additive_mask, positions
from shared.models.rows import DECODE, PREFILL, row_plan

log = logging.getLogger(__name__)

# Config attributes that name a model's context length, in the order families use them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len", "max_sequence_length")


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
    default_context_length = 2048  # for configs that name none (ALiBi models such as BLOOM)

    # ---- facts about a config (the only place outside transformers that reads its attributes)
    def context_length(self, config) -> int:
        for key in CONTEXT_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return self.default_context_length

    def kv_shape(self, config) -> tuple[int, int]:
        """(key/value heads, head dim) of one layer's cache."""
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return heads, head_dim

    def kv_bytes_per_token(self, config, dtype: torch.dtype) -> int:
        """Bytes of keys and values one token occupies in one layer's cache."""
        heads, head_dim = self.kv_shape(config)
        return 2 * heads * head_dim * dtype.itemsize

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

    batching = "ragged"  # how decode steps of several sessions share a pass (shared/models/batch.py)

    # ---- one step
    def prepare(self, span: LoadedSpan, hidden: torch.Tensor, full_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> StepInputs:
        """Masks, positions and the like for a step of `hidden` [batch, tokens, hidden] whose
        padding mask over every position is `full_mask` [batch, keys]. `position_ids` overrides the
        positions derived from the mask (a padded batch of sessions knows them per session)."""
        raise NotImplementedError

    def position_inputs(self, span: LoadedSpan, hidden: torch.Tensor, position_ids: torch.Tensor) -> StepInputs:
        """What a step needs besides masks: positions and what is computed from them (rotary)."""
        raise NotImplementedError

    def prepare_batch(self, span: LoadedSpan, hidden: torch.Tensor, full_masks: list[torch.Tensor],
                      tokens: list[int], caches: list[SpanCache]) -> tuple[StepInputs, BatchView]:
        """Inputs for a step of several sessions at once. Ragged: hidden [sum of rows_i x tokens_i,
        1, hidden], each session's new tokens flattened into rows (everything but attention works
        per token). Padded: hidden [sum of rows_i, 1, hidden] (one token each). full_masks[i]
        [rows_i, keys_i] is session i's mask over its own positions, new tokens included."""
        if self.batching == "padded":
            rows = [m.shape[0] for m in full_masks]
            position_ids = torch.cat([positions(m, 1) for m in full_masks])
            padded = pad_stack([m for m in full_masks], dim=1)
            return self.prepare(span, hidden, padded, position_ids), BatchView(caches, rows, [1] * len(rows), True)
        position_ids = torch.cat([positions(m, t).reshape(-1, 1) for m, t in zip(full_masks, tokens)])
        inputs = self.position_inputs(span, hidden, position_ids)
        inputs.masks = {w: None for w in set(span.windows)}  # each session's mask travels with its cache
        per_window = {w: [_step_mask(m, t, hidden.dtype, w) for m, t in zip(full_masks, tokens)]
                      for w in set(span.windows)}
        view = BatchView(caches, [m.shape[0] for m in full_masks], tokens, padded=False,
                         masks=lambda layer: per_window[span.windows[layer - span.start]])
        return inputs, view

    def run_layer(self, span: LoadedSpan, layer: nn.Module, index: int, hidden: torch.Tensor,
                  inputs: StepInputs, cache: SpanCache) -> torch.Tensor:
        raise NotImplementedError

    # ---- gateway ends
    def end_modules(self, skeleton: nn.Module) -> dict[str, nn.Module]:
        base = skeleton.get_submodule(self.base_path)
        return {"embed": skeleton.get_input_embeddings(), "norm": getattr(base, self.final_norm),
                "head": skeleton.get_output_embeddings()}


def _add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, position: int) -> torch.Tensor:
    """hidden [batch, tokens, hidden] of positions [position, position + tokens), with the deep
    prompt [prompt tokens, hidden] added to those among positions [0, prompt tokens)."""
    count = min(hidden.shape[1], prompt.shape[0] - position)
    if count <= 0:
        return hidden
    added = hidden[:, :count] + prompt[position:position + count]
    return torch.cat([added, hidden[:, count:]], dim=1)


def _step_mask(full_mask: torch.Tensor, tokens: int, dtype: torch.dtype, window: int | None) -> torch.Tensor | None:
    """The additive mask of a session's new tokens over its positions, or None for one token that
    may see all of them (no padding, no window cutting in): SDPA then needs no mask at all."""
    keys = full_mask.shape[1]
    if tokens == 1 and bool(full_mask.all()) and (window is None or window >= keys):
        return None
    return additive_mask(full_mask, tokens, dtype, window)


def build_skeleton(config) -> nn.Module:
    """The whole *ForCausalLM with its parameters on the meta device: structure only, no memory.
    Buffers stay real: the few the checkpoint does not store (Gemma's embedding scale, rotary
    frequencies) are computed by the modules themselves and would be lost on meta."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype,
                what: str) -> int:
    """Replace a meta module's parameters and buffers by `tensors`; return the number of values loaded.
    Buffers the skeleton computed itself (not on meta) only move to the device."""
    computed = {n for n, b in module.named_buffers() if not b.is_meta}
    for name in computed - set(tensors):
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        owner._buffers[leaf] = owner._buffers[leaf].to(device)
    expected = dict(module.named_parameters()) | {n: b for n, b in module.named_buffers() if n not in computed}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise BadRequest(f"checkpoint lacks tensors of {what}: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    values = {}
    for name, tensor in tensors.items():
        if name not in expected:
            continue
        if tensor.shape != expected[name].shape:
            raise BadRequest(f"{what}: {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"{tuple(expected[name].shape)} in the config")
        values[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    module.load_state_dict(values, strict=False, assign=True)
    module.requires_grad_(False)  # the served weights are frozen; fine-tuning trains the client's parameters
    return sum(v.numel() for v in values.values())


class LoadedSpan:
    """Layers [start, end) of one model, on one device, in one dtype, ready to run steps."""

    def __init__(self, family: Family, config, start: int, end: int, layers: nn.ModuleList,
                 rotary: nn.Module | None, device: torch.device, dtype: torch.dtype, loaded_values: int,
                 quant: str = "none"):
        self.family, self.config = family, config
        self.quant = quant  # how the layers' Linear weights are stored (shared/models/quant.py)
        self.start, self.end = start, end
        self.layers, self.rotary = layers, rotary
        self.device, self.dtype = device, dtype
        self.loaded_values = loaded_values  # parameters actually read from the checkpoint
        self.windows = [family.window(config, i) for i in range(start, end)]
        self.batch_invariant = True  # steps run their rows in fixed tiles (shared/models/rows.py)
        self.compiled = None  # a CompiledDecode once compile_decode() has run
        self.hidden_size = config.hidden_size
        self.context_length = family.context_length(config)
        if family.batching == "ragged" and config._attn_implementation != ATTENTION:
            register_attention()  # the layers now attend through batch.corolla_attention
            config.corolla_base_attention = config._attn_implementation
            config._attn_implementation = ATTENTION

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def new_cache(self, batch_size: int, max_length: int, capacity: int | None = None) -> SpanCache:
        return SpanCache(batch_size, max_length, self.device, capacity)

    @torch.inference_mode()
    def step(self, hidden: torch.Tensor, cache: SpanCache, new_mask: torch.Tensor | None = None,
             start: int | None = None, end: int | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens through layers [start, end) of the span (default: all of it).
        hidden: [batch, tokens, hidden] -> same shape.

        new_mask [batch, tokens] marks padding (0) among the new tokens; None means none.
        prompts [end - start, prompt tokens, hidden]: deep prompts, added before each layer to the
        hidden states of the session's first positions (those among this step's tokens)."""
        first, last = self._range(start, end)
        if hidden.dim() != 3 or hidden.shape[0] != cache.batch_size or hidden.shape[2] != self.hidden_size:
            raise BadRequest(f"hidden must be [{cache.batch_size}, tokens, {self.hidden_size}], "
                             f"got {list(hidden.shape)}")
        hidden = hidden.to(self.device, self.dtype)
        position = cache.length
        full_mask = cache.begin_step(new_mask, hidden.shape[1])
        try:
            with row_plan(self._plan([hidden.shape[:2]])):
                inputs = self.family.prepare(self, hidden, full_mask)
                for i, offset in enumerate(range(first, last)):
                    if prompts is not None:
                        hidden = _add_prompt(hidden, prompts[i], position)
                    hidden = self.family.run_layer(self, self.layers[offset], self.start + offset, hidden, inputs,
                                                   cache)
        except BaseException:
            cache.abort_step()
            raise
        cache.commit_step()
        return hidden

    def _plan(self, shapes) -> list[tuple[int, str]] | None:
        """The row plan of a step of sessions whose hidden states are [rows, tokens] (in order)."""
        if not self.batch_invariant:
            return None
        return [(rows * tokens, DECODE if tokens == 1 else PREFILL) for rows, tokens in shapes]

    def _range(self, start: int | None, end: int | None) -> tuple[int, int]:
        """Layers [start, end) (global) as offsets into this span's list."""
        return (self.start if start is None else start) - self.start, (self.end if end is None else end) - self.start

    # ---- stateless passes (scoring, fine-tuning): no cache outlives the call
    def _pass(self, hidden: torch.Tensor, mask: torch.Tensor | None, first: int, last: int,
              prompts: torch.Tensor | None, keep_inputs: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        full_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=self.device) if mask is None else \
            mask.to(self.device, torch.long)
        inputs = self.family.prepare(self, hidden, full_mask)
        layer_inputs = []
        for i, offset in enumerate(range(first, last)):
            if prompts is not None:
                hidden = _add_prompt(hidden, prompts[i], 0)
            if keep_inputs:
                layer_inputs.append(hidden)
            hidden = self.family.run_layer(self, self.layers[offset], self.start + offset, hidden, inputs, None)
        return hidden, layer_inputs

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Whole sequences through layers [start, end), with no cache kept. hidden [batch, tokens,
        hidden]; mask [batch, tokens] (0: padding); prompts as in `step` (at positions 0..P-1)."""
        first, last = self._range(start, end)
        return self._pass(hidden.to(self.device, self.dtype), mask, first, last,
                          None if prompts is None else prompts.to(self.device, self.dtype), False)[0]

    def backward(self, hidden: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None,
                 prompts: torch.Tensor | None = None, start: int | None = None,
                 end: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradient of a loss with respect to this pass's input and deep prompts, given `grad`,
        its gradient with respect to the output. The forward is recomputed (nothing is stored
        between calls) and each layer's graph is built, used and dropped in turn, so memory holds
        one layer's activations plus each layer's input. The weights stay frozen."""
        first, last = self._range(start, end)
        hidden = hidden.to(self.device, self.dtype)
        prompts = None if prompts is None else prompts.to(self.device, self.dtype)
        with torch.no_grad():
            _, layer_inputs = self._pass(hidden, mask, first, last, prompts, True)
        full_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=self.device) if mask is None else \
            mask.to(self.device, torch.long)
        inputs = self.family.prepare(self, hidden, full_mask)
        grad = grad.to(self.device, self.dtype)
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for i in reversed(range(last - first)):
            with torch.enable_grad():
                x = layer_inputs[i].detach().requires_grad_(True)
                y = self.family.run_layer(self, self.layers[first + i], self.start + first + i, x, inputs, None)
                torch.autograd.backward(y, grad)
            grad = x.grad  # d loss / d (layer input, prompt added) = d loss / d (previous output)
            if grad_prompts is not None:
                length = prompts.shape[1]
                grad_prompts[i] = grad[:, :length].sum(0)
        return grad, grad_prompts

    @torch.inference_mode()
    def step_batch(self, hiddens: list[torch.Tensor], caches: list[SpanCache], masks: list[torch.Tensor | None],
                   start: int | None = None, end: int | None = None) -> list[torch.Tensor]:
        """A step of each of several sessions in one pass over layers [start, end): hiddens[i]
        [rows_i, tokens_i, hidden] -> the same shapes; masks[i] [rows_i, tokens_i] marks padding among
        the new tokens (None: none). Families batched "padded" take one token per session.

        With a compiled decode step (`compile_decode`), the one-token steps of the whole span go
        through its graphs in row buckets, the rest eagerly; if any part fails, none has happened."""
        first, last = self._range(start, end)
        compiled = self.compiled
        if compiled is None or (first, last) != (0, len(self.layers)):
            return self._step_batch(hiddens, caches, masks, first, last)
        fast = [i for i, h in enumerate(hiddens) if h.shape[1] == 1 and h.shape[0] <= compiled.max_rows]
        if not fast:
            return self._step_batch(hiddens, caches, masks, first, last)
        parts, rows = [[]], 0
        for i in fast:  # sessions packed into buckets, never split
            if rows + hiddens[i].shape[0] > compiled.max_rows:
                parts.append([])
                rows = 0
            parts[-1].append(i)
            rows += hiddens[i].shape[0]
        rest = sorted(set(range(len(hiddens))) - set(fast))
        outs: list[torch.Tensor | None] = [None] * len(hiddens)
        positions = [c.length for c in caches]
        try:
            for part in parts:
                for i, out in zip(part, self._step_compiled([hiddens[i] for i in part], [caches[i] for i in part],
                                                            [masks[i] for i in part])):
                    outs[i] = out
            if rest:
                for i, out in zip(rest, self._step_batch([hiddens[i] for i in rest], [caches[i] for i in rest],
                                                         [masks[i] for i in rest], first, last)):
                    outs[i] = out
        except BaseException:
            for cache, position in zip(caches, positions):
                cache.truncate(min(position, cache.length))
            raise
        return outs

    def compile_decode(self, progress=None) -> None:
        """Compile this span's decode step (shared/models/compiled.py) and warm it up: slow, once.
        progress(rows) is called as each row bucket starts compiling."""
        from shared.models.compiled import CompiledDecode

        compiled = CompiledDecode(self)
        self.compiled = compiled
        try:
            compiled.warm_up(progress)
        except BaseException:
            self.compiled = None
            raise

    def _step_compiled(self, hiddens: list[torch.Tensor], caches: list[SpanCache],
                       masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        shapes = [h.shape for h in hiddens]
        hidden = torch.cat([h.reshape(-1, 1, h.shape[2]) for h in hiddens]).to(self.device, self.dtype)
        try:
            full_masks = [cache.begin_step(mask, 1) for cache, mask in zip(caches, masks)]
            inputs, view = self.family.prepare_batch(self, hidden, full_masks, [1] * len(hiddens), caches)
            cos, sin = inputs.position_embeddings
            hidden = self.compiled.run(hidden, cos, sin, view)
        except BaseException:
            for cache in caches:
                cache.abort_step()
            raise
        for cache in caches:
            cache.commit_step()
        return [out.reshape(shape) for out, shape in zip(hidden.split([s[0] for s in shapes]), shapes)]

    def _step_batch(self, hiddens: list[torch.Tensor], caches: list[SpanCache], masks: list[torch.Tensor | None],
                    first: int, last: int) -> list[torch.Tensor]:
        shapes = [h.shape for h in hiddens]
        tokens = [s[1] for s in shapes]
        hidden = torch.cat([h.reshape(-1, 1, h.shape[2]) for h in hiddens]).to(self.device, self.dtype)
        full_masks = []
        try:
            for cache, mask, t in zip(caches, masks, tokens):
                full_masks.append(cache.begin_step(mask, t))
            with row_plan(self._plan([s[:2] for s in shapes])):
                inputs, view = self.family.prepare_batch(self, hidden, full_masks, tokens, caches)
                for offset in range(first, last):
                    hidden = self.family.run_layer(self, self.layers[offset], self.start + offset, hidden, inputs,
                                                   view)
        except BaseException:
            for cache in caches:
                cache.abort_step()
            raise
        for cache in caches:
            cache.commit_step()
        return [out.reshape(shape) for out, shape in zip(hidden.split([s[0] * s[1] for s in shapes]), shapes)]



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
        self.logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides its logits
        self.embedding_multiplier = getattr(config, "embedding_multiplier", None)  # Granite scales inputs_embeds
        self.compiled_head = None  # RowGraphs once compile_head() has run

    @torch.inference_mode()
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] -> [batch, tokens, hidden]: what the first layer receives."""
        return self.prepare_inputs(self.embed(input_ids))

    def prepare_inputs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """What the model does to input embeddings before its first layer (BLOOM's LayerNorm;
        nothing for most). It works per token, so a soft prompt [tokens, hidden] can go through it
        alone and be prepended, exactly as if it had been given as `inputs_embeds`."""
        if self.embedding_multiplier not in (None, 1.0):
            embeddings = embeddings * self.embedding_multiplier
        return self.embed_norm(embeddings) if self.embed_norm is not None else embeddings

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] -> [batch, tokens, vocab] in float32. One-token rows go through
        the compiled head when there is one (`compile_head`), in passes of its largest bucket."""
        graphs = self.compiled_head
        if graphs is None or hidden.shape[1] != 1:
            return self.head_logits(hidden)
        parts = [graphs(rows) for rows in hidden.split(graphs.max_rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def compile_head(self) -> None:
        """Compile the final norm and LM head for one-token rows (shared/models/compiled.py): slow, once."""
        from shared.models.compiled import compiled_head

        self.compiled_head = compiled_head(self)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits` with autograd (fine-tuning differentiates through the head): the final norm,
        the LM head, then the family's logit transforms (Granite's scaling, Gemma 2's soft cap)."""
        logits = self.head(self.norm(hidden.to(self.head.weight.dtype))).float()
        if self.logits_scaling:
            logits = logits / self.logits_scaling
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

