"""Gemma 2 and Gemma 3 (text): Llama-style layers with their own quirks, all handled by
transformers' layers given the right inputs.
- Both scale their embeddings inside the embedding module (a buffer the skeleton computes) and
  alternate sliding-window and full layers (`layer_types`, in each layer's mask).
- Gemma 2 soft-caps attention scores (eager attention: transformers picks it, and the span's
  attention delegates to Gemma's own eager function) and the final logits (on the gateway).
- Gemma 3 has one rotary embedding per layer type (local layers use another base frequency):
  each layer gets the position embeddings of its type."""

import torch

from shared.models.base import LoadedSpan, StepInputs
from shared.models.families.llama import LlamaFamily


class GemmaFamily(LlamaFamily):
    name = "gemma"
    model_types = ("gemma2", "gemma3_text")

    def position_inputs(self, span: LoadedSpan, hidden: torch.Tensor, position_ids: torch.Tensor) -> StepInputs:
        if span.config.model_type != "gemma3_text":
            return super().position_inputs(span, hidden, position_ids)
        types = sorted(set(span.config.layer_types))
        return StepInputs(position_ids=position_ids,
                          position_embeddings={t: span.rotary(hidden, position_ids, t) for t in types})

    def run_layer(self, span, layer, index, hidden, inputs, cache):
        embeddings = inputs.position_embeddings
        if isinstance(embeddings, dict):
            embeddings = embeddings[span.config.layer_types[index]]
        return layer(hidden, attention_mask=inputs.masks[span.windows[index - span.start]],
                     position_ids=inputs.position_ids, cache=cache, use_cache=True, position_embeddings=embeddings)
