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
        Gemma2Config,
        Gemma3TextConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
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
        # Gemma 2: alternating 8-token windows, attention and final logit soft-capping, scaled embeddings
        "gemma2": Gemma2Config(**llama_like, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0,
                               final_logit_softcapping=3.0, query_pre_attn_scalar=16),
        # Gemma 3 (text): a rotary per layer type, sliding layers every one but each third
        "gemma3": Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2),
        # Phi-3: fused qkv and gate_up projections
        "phi3": Phi3Config(**llama_like, tie_word_embeddings=False),
        # Qwen3-MoE: experts on every layer but one dense MLP layer
        "qwen3-moe": Qwen3MoeConfig(**llama_like, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=48, mlp_only_layers=[2], tie_word_embeddings=False),
        # Granite: embedding, residual, attention and logit multipliers
        "granite": GraniteConfig(**llama_like, embedding_multiplier=3.0, residual_multiplier=0.5,
                                 attention_multiplier=0.2, logits_scaling=2.0, tie_word_embeddings=False),
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
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory, **kwargs)
    char_tokenizer().save_pretrained(directory)
    return directory


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def char_tokenizer():
    """A character-level tokenizer over printable ASCII (one token per character), so that any
    token sequence decodes to plain text. Ids 0-2 are <pad>, <s>, </s>; the rest of the
    vocabulary decodes to '<xN>'."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    while len(vocab) < VOCAB:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)
