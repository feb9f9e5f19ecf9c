"""Decode steps of several sessions as one forward pass over a span: every Linear and MLP runs once
for all their rows; attention stays per session, over each session's own cache.

Two ways, chosen by the family:
- *ragged* (families whose attention goes through transformers' attention interface: Llama,
  Mistral, Qwen, Mixtral, ...): `BatchView.update` writes each session's new keys and values into
  its own SpanCache and leaves, in the attention kwargs, each session's whole keys, values and
  mask; the `corolla` attention function registered below then runs the model's own attention
  once per session on its rows of the queries. No cache is copied. (Measured on a SmolLM2 layer
  before building it: a loop of per-session SDPA calls costs about what one padded SDPA does,
  while padding the caches to a common length costs more in copies than it saves.)
- *padded* (BLOOM and Falcon compute attention themselves): `BatchView.update` returns the
  sessions' keys and values stacked and right-padded to the longest, and the family's mask and
  alibi hide the padding. Exact as well, at the price of one copy of the caches per layer.

Sessions may sit at any position; each one's rows see only its own cache. Results equal the
sessions' solo steps up to float rounding (GEMM blocking differs with the batch size)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from shared.models.cache import SpanCache

ATTENTION = "corolla"
_registered = False


def register_attention() -> None:
    """Register the `corolla` attention function with transformers (once; no import-time work)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, corolla_attention)
    _registered = True


def corolla_attention(module, query, key, value, attention_mask, **kwargs):
    """A span's attention: per session when a BatchView left the sessions in kwargs, else the
    model's own implementation (recorded on the config when the span switched to this one).
    In a compiled decode graph (shared/models/compiled.py) it is the opaque custom op instead."""
    if kwargs.pop("corolla_compiled", False):
        return torch.ops.corolla.decode_attention(query, key, value, module.layer_idx, kwargs["scaling"]), None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sessions = kwargs.pop("corolla_sessions", None)
    base = getattr(module.config, "corolla_base_attention", "sdpa")
    if base == "eager":  # the model's own (Gemma 2's soft-caps its scores)
        attend = sys.modules[type(module).__module__].eager_attention_forward
    elif base == "sdpa" and query.shape[2] == 1 and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux")):
        attend = decode_attention
    else:
        attend = ALL_ATTENTION_FUNCTIONS[base]
    if sessions is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    outputs, start = [], 0
    for k, v, mask, rows, tokens in sessions:
        # this session's queries, flattened as rows x tokens, back to [rows, heads, tokens, dim]
        q = query[start:start + rows * tokens]
        q = q.reshape(rows, tokens, q.shape[1], q.shape[3]).transpose(1, 2)
        session_attend = attend if tokens == 1 or attend is not decode_attention else ALL_ATTENTION_FUNCTIONS["sdpa"]
        out, _ = session_attend(module, q, k, v, mask, **kwargs)  # [rows, tokens, heads, dim]
        outputs.append(out.reshape(rows * tokens, 1, out.shape[2], out.shape[3]))
        start += rows * tokens
    return torch.cat(outputs, dim=0), None


def decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA for one query position, with the query heads of each KV head packed as that head's
    queries: query [rows, heads, 1, d], key/value [rows, kv_heads, keys, d]. The same arithmetic as
    transformers' SDPA path, but without its `enable_gqa` branch, whose bfloat16 CPU kernel is
    measured 4.5x slower for one query (95 us vs 21 us for 9 heads over 3 KV heads, 100 keys)."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    mask = None if attention_mask is None else attention_mask[..., -1:, :].expand(rows, 1, heads // kv_heads, -1)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2), None


class BatchView:
    """Several sessions' caches seen by the layers as one cache of their stacked rows (session i
    has rows[i] rows of tokens[i] new tokens, flattened). `masks(layer_idx)` gives each session's
    additive mask for that layer (ragged mode)."""

    def __init__(self, caches: list[SpanCache], rows: list[int], tokens: list[int], padded: bool, masks=None):
        self.caches, self.rows, self.tokens, self.padded, self._masks = caches, rows, tokens, padded, masks
        self._sizes = [r * t for r, t in zip(rows, tokens)]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, kwargs=None, **extra):
        full = []
        for cache, k, v, rows, tokens in zip(self.caches, key.split(self._sizes), value.split(self._sizes),
                                             self.rows, self.tokens):
            if tokens > 1:  # [rows x tokens, heads, 1, dim] -> [rows, heads, tokens, dim]
                k = k.reshape(rows, tokens, k.shape[1], k.shape[3]).transpose(1, 2)
                v = v.reshape(rows, tokens, v.shape[1], v.shape[3]).transpose(1, 2)
            full.append(cache.update(k, v, layer_idx))
        if self.padded:
            return pad_stack([k for k, _ in full]), pad_stack([v for _, v in full])
        if kwargs is None:
            raise RuntimeError("this attention does not pass its kwargs to the cache; batch it padded")
        masks = self._masks(layer_idx)
        kwargs["corolla_sessions"] = [(k, v, mask, rows, tokens) for (k, v), mask, rows, tokens in
                                      zip(full, masks, self.rows, self.tokens)]
        return key, value


def pad_stack(tensors: list[torch.Tensor], dim: int = 2) -> torch.Tensor:
    """Stack along dim 0, right-padding dimension `dim` with zeros to the longest."""
    longest = max(t.shape[dim] for t in tensors)
    padded = []
    for t in tensors:
        missing = longest - t.shape[dim]
        if missing:
            pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
            t = F.pad(t, pad)
        padded.append(t)
    return torch.cat(padded, dim=0)
