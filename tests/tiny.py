"""Tiny random models of every supported family, saved as real checkpoints (nothing downloaded)."""

from pathlib import Path

import torch

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def configs() -> dict:
    from transformers import (
        BloomConfig,
        FalconConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    llama_like = dict(COMMON, intermediate_size=96, num_hidden_layers=6, num_key_value_heads=2)
    return {
        "llama": LlamaConfig(**llama_like, tie_word_embeddings=False),
        # windows of 8 tokens so that 20+ decode steps run past them
        "mistral": MistralConfig(**llama_like, sliding_window=8),
        "qwen2": Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=8, max_window_layers=3,
                             tie_word_embeddings=True),
        "qwen3": Qwen3Config(**llama_like, head_dim=16, use_sliding_window=True, sliding_window=8,
                             max_window_layers=2, tie_word_embeddings=False),
        "mixtral": MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
        "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=64, n_head=4, n_layer=6, bos_token_id=1,
                             eos_token_id=2, pad_token_id=0),
        # Falcon-40B/180B style: grouped KV heads, two LayerNorms
        "falcon-new": FalconConfig(**COMMON, num_hidden_layers=6, new_decoder_architecture=True, num_kv_heads=2,
                                   parallel_attn=True, alibi=False, bias=False),
        # Falcon-7B style: multi-query, parallel attention, rotary
        "falcon-7b": FalconConfig(**COMMON, num_hidden_layers=6, new_decoder_architecture=False,
                                  multi_query=True, parallel_attn=True, alibi=False, bias=False),
        # Falcon-RW style: ALiBi, sequential attention then MLP, full heads
        "falcon-rw": FalconConfig(**COMMON, num_hidden_layers=6, new_decoder_architecture=False,
                                  multi_query=False, parallel_attn=False, alibi=True, bias=True),
    }


def save_model(name: str, directory: Path, max_shard_size: str | None = None) -> Path:
    """Build the tiny random model `name` (seeded) and save it as a safetensors checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[name], dtype=torch.float32)
    # Random init is small; scale weights up so logits spread and greedy choices are not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory
