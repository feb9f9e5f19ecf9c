"""Falcon in its three layer styles: the new decoder architecture (40B/180B: grouped KV heads, two
LayerNorms), multi-query with parallel attention (7B), and the RW style (ALiBi, sequential).

Rotary Falcons get position embeddings from the decoder's rotary module; ALiBi Falcons fold the
alibi (scaled by 1/sqrt(head_dim)) into the additive mask exactly as `FalconModel` does."""

import math

import torch
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from shared.models.base import Family, LoadedSpan, StepInputs
from shared.models.masks import additive_mask, positions


class FalconFamily(Family):
    name = "falcon"
    model_types = ("falcon",)
    layers_path = "transformer.h"
    base_path = "transformer"
    final_norm = "ln_f"
    batching = "padded"  # its attention calls SDPA itself

    def window(self, config, index):
        return None

    def kv_shape(self, config):
        # What transformers' FalconAttention caches: 7B is multi-query (one KV head, though its
        # config still says num_kv_heads = heads); 40B/180B group their KV heads but expand them to
        # every attention head before the cache; RW keeps num_kv_heads.
        if config.new_decoder_architecture:
            heads = config.num_attention_heads
        elif config.multi_query:
            heads = 1
        else:
            heads = config.num_kv_heads
        return heads, config.hidden_size // config.num_attention_heads

    def prepare(self, span: LoadedSpan, hidden: torch.Tensor, full_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> StepInputs:
        batch, tokens, _ = hidden.shape
        config = span.config
        mask = additive_mask(full_mask, tokens, hidden.dtype)
        position_ids = positions(full_mask, tokens) if position_ids is None else position_ids
        inputs = StepInputs(position_ids=position_ids)
        if config.alibi:
            heads = config.num_attention_heads
            alibi = build_alibi_tensor(full_mask, heads, dtype=hidden.dtype)
            folded = alibi.reshape(batch, heads, 1, -1) / math.sqrt(config.hidden_size // heads)
            inputs.alibi = alibi
            inputs.masks = {None: torch.masked_fill(folded, mask < -1, torch.finfo(hidden.dtype).min)}
        else:
            inputs.masks = {None: mask}
            inputs.position_embeddings = span.rotary(hidden, position_ids=position_ids)
        return inputs

    def run_layer(self, span, layer, index, hidden, inputs, cache):
        return layer(hidden, alibi=inputs.alibi, attention_mask=inputs.masks[None],
                     position_ids=inputs.position_ids, layer_past=cache, use_cache=True,
                     position_embeddings=inputs.position_embeddings)[0]
