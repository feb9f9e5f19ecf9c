"""Attention masks and positions built from a session's 2-D padding mask, as transformers builds them."""

import torch


def positions(full_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """Position ids of the last `tokens` columns: count of real tokens before each one, as
    `generate` computes them (padding gets 1). full_mask: [batch, keys] -> [batch, tokens]."""
    pos = full_mask.long().cumsum(-1) - 1
    pos.masked_fill_(full_mask == 0, 1)
    return pos[:, -tokens:]


def additive_mask(full_mask: torch.Tensor, tokens: int, dtype: torch.dtype,
                  window: int | None = None) -> torch.Tensor:
    """Float mask [batch, 1, tokens, keys]: 0 where a query may attend, dtype-min elsewhere.

    Causality and sliding windows count cache indices (as transformers' masks do), padding comes
    from full_mask [batch, keys]. The queries are the last `tokens` keys."""
    keys = full_mask.shape[1]
    device = full_mask.device
    q_idx = torch.arange(keys - tokens, keys, device=device)[:, None]
    kv_idx = torch.arange(keys, device=device)[None, :]
    allowed = kv_idx <= q_idx  # [tokens, keys]
    if window is not None:
        allowed = allowed & (kv_idx > q_idx - window)
    allowed = allowed[None, None] & full_mask.bool()[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

