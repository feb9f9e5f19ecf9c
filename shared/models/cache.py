"""The KV cache of one session on one span, with its padding mask, truncation and beam reordering.

It is duck-typed to what transformers' attention layers call (`update(key, value, layer_idx)`), so
the real `transformers` layers write into it directly. Keys and values live in preallocated
tensors of `capacity` tokens, written in place; `grow` enlarges them (a copy) when the session's
owner has reserved more room, up to `max_length`. The owner reserves in pages, so a session holds
memory for what it has used, not for the longest it may become.
"""

import torch

from shared.errors import BadRequest


class SpanCache:
    def __init__(self, batch_size: int, max_length: int, device: torch.device | str = "cpu",
                 capacity: int | None = None):
        self.batch_size = batch_size
        self.max_length = max_length
        self.capacity = min(max_length, capacity or max_length)  # tokens the tensors hold room for
        self.device = torch.device(device)
        self.length = 0  # tokens held (the session's position)
        self._pending = 0  # tokens of the step being run, committed when every layer has run
        self.pad_mask = torch.ones(batch_size, self.capacity, dtype=torch.long, device=self.device)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` tokens (never beyond max_length), keeping what is held."""
        capacity = min(capacity, self.max_length)
        if capacity <= self.capacity:
            return
        mask = torch.ones(self.batch_size, capacity, dtype=torch.long, device=self.device)
        mask[:, :self.length] = self.pad_mask[:, :self.length]
        self.pad_mask = mask
        for layer, (k, v) in self._kv.items():
            bigger_k = k.new_zeros(k.shape[:2] + (capacity, k.shape[3]))
            bigger_v = v.new_zeros(v.shape[:2] + (capacity, v.shape[3]))
            bigger_k[:, :, :self.length] = k[:, :, :self.length]
            bigger_v[:, :, :self.length] = v[:, :, :self.length]
            self._kv[layer] = (bigger_k, bigger_v)
        self.capacity = capacity

    def begin_step(self, new_mask: torch.Tensor | None, tokens: int) -> torch.Tensor:
        """Record the new tokens' padding mask; return the mask of every token held plus the new ones.
        new_mask: [batch, tokens] of 0/1, or None for no padding. Returns [batch, length + tokens]."""
        end = self.length + tokens
        if end > self.capacity:
            raise BadRequest(f"step of {tokens} tokens at position {self.length} exceeds the session's "
                             f"room of {self.capacity} tokens (max_length {self.max_length})")
        if new_mask is None:
            self.pad_mask[:, self.length:end] = 1
        else:
            self.pad_mask[:, self.length:end] = new_mask.to(self.pad_mask.device, torch.long)
        self._pending = tokens
        return self.pad_mask[:, :end]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store one layer's new keys/values [batch, heads, tokens, head_dim]; return all held ones."""
        stored = self._kv.get(layer_idx)
        if stored is None:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            stored = (key.new_zeros(shape), value.new_zeros(shape[:3] + (value.shape[3],)))
            self._kv[layer_idx] = stored
        k, v = stored
        start, end = self.length, self.length + key.shape[2]
        k[:, :, start:end] = key
        v[:, :, start:end] = value
        return k[:, :, :end], v[:, :, :end]

    def commit_step(self) -> None:
        self.length += self._pending
        self._pending = 0

    def abort_step(self) -> None:
        self._pending = 0

    def truncate(self, position: int) -> None:
        """Forget every token from `position` on (speculative rollback, replays)."""
        if not 0 <= position <= self.length:
            raise BadRequest(f"position {position} is beyond the {self.length} tokens this cache holds")
        self.length = position

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Reorder the batch (beam search): row i becomes the old row hypo_ids[i]."""
        hypo_ids = hypo_ids.to(self.device, torch.long)
        if hypo_ids.shape != (self.batch_size,) or bool((hypo_ids < 0).any() | (hypo_ids >= self.batch_size).any()):
            raise BadRequest(f"hypo_ids must be {self.batch_size} indices in [0, {self.batch_size})")
        self.pad_mask = self.pad_mask.index_select(0, hypo_ids)
        self._kv = {i: (k.index_select(0, hypo_ids), v.index_select(0, hypo_ids)) for i, (k, v) in self._kv.items()}

    def free(self) -> None:
        """Drop the keys and values now (on the thread that made them)."""
        self._kv.clear()

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._kv.values())
