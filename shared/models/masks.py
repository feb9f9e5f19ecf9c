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

    Causality counts cache indices; padding comes from full_mask [batch, keys]; a sliding window
    counts real positions, so that padding inside a row (after a soft prompt) does not shrink it:
    each row attends as it would alone. With padding only at the start of rows this is exactly
    transformers' mask, which counts the window in cache indices. The queries are the last
    `tokens` keys."""
    keys = full_mask.shape[1]
    device = full_mask.device
    q_idx = torch.arange(keys - tokens, keys, device=device)[:, None]
    kv_idx = torch.arange(keys, device=device)[None, :]
    allowed = (kv_idx <= q_idx)[None, None]  # [1, 1, tokens, keys]
    if window is not None:
        real = full_mask.long().cumsum(-1)  # [batch, keys]: real tokens up to each key
        distance = real[:, -tokens:, None] - real[:, None, :]  # [batch, tokens, keys]
        allowed = allowed & (distance < window)[:, None]
    allowed = allowed & full_mask.bool()[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

