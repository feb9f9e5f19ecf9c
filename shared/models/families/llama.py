"""Llama-style decoders with rotary positions: Llama (and SmolLM2), Mistral, Qwen2, Qwen3, Phi-3
(fused projections, as its checkpoints store them) and Granite (its residual and attention
multipliers live in the layers; its embedding and logit multipliers at the ends, ModelEnds).

Their layers take an additive mask, position ids and the (cos, sin) position embeddings that the
decoder's rotary module computes once per step, and return a tensor. Sliding windows (Mistral on
every layer, Qwen2/3 per `layer_types`) are in the mask of each layer.
"""

import torch

from shared.models.base import Family, LoadedSpan, StepInputs
from shared.models.masks import additive_mask, positions


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite")

    def prepare(self, span: LoadedSpan, hidden: torch.Tensor, full_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> StepInputs:
        tokens = hidden.shape[1]
        position_ids = positions(full_mask, tokens) if position_ids is None else position_ids
        inputs = self.position_inputs(span, hidden, position_ids)
        inputs.masks = {w: additive_mask(full_mask, tokens, hidden.dtype, w) for w in set(span.windows)}
        return inputs

    def position_inputs(self, span: LoadedSpan, hidden: torch.Tensor, position_ids: torch.Tensor) -> StepInputs:
        return StepInputs(position_ids=position_ids, position_embeddings=span.rotary(hidden, position_ids=position_ids))

    def run_layer(self, span, layer, index, hidden, inputs, cache):
        return layer(
            hidden,
            attention_mask=inputs.masks[span.windows[index - span.start]],
            position_ids=inputs.position_ids,
            cache=cache,
            use_cache=True,
            position_embeddings=inputs.position_embeddings,
        )
