"""BLOOM: ALiBi instead of rotary positions, built from the session's whole 2-D padding mask; the
embedding LayerNorm belongs to the gateway's ends; blocks return a tuple."""

import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from shared.models.base import Family, LoadedSpan, StepInputs
from shared.models.masks import additive_mask


class BloomFamily(Family):
    name = "bloom"
    model_types = ("bloom",)
    layers_path = "transformer.h"
    base_path = "transformer"
    final_norm = "ln_f"
    batching = "padded"  # its attention computes scores itself

    def rotary(self, skeleton, config, device):
        return None

    def window(self, config, index):
        return None

    def prepare(self, span: LoadedSpan, hidden: torch.Tensor, full_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> StepInputs:
        return StepInputs(
            masks={None: additive_mask(full_mask, hidden.shape[1], hidden.dtype)},
            alibi=build_alibi_tensor(full_mask, span.config.n_head, hidden.dtype),
        )

    def run_layer(self, span, layer, index, hidden, inputs, cache):
        return layer(hidden, alibi=inputs.alibi, attention_mask=inputs.masks[None], layer_past=cache,
                     use_cache=True)[0]

    def end_modules(self, skeleton):
        modules = super().end_modules(skeleton)
        modules["embed_norm"] = skeleton.get_submodule(self.base_path).word_embeddings_layernorm
        return modules
