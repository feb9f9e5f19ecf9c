"""A generation's decoding state: what each step costs must not grow with the answer.

`DecodeState` holds every row's token ids and attention mask in buffers sized once for the whole
answer (prompt + max_tokens); the ends' tick writes each chosen token into them on the compute
thread, so the event loop never concatenates or counts. A generation goes through its phases in
order: `prefill` (the prompt through the chain), `decode` steps (one token per row each), `finish`
(usage); `rollback(n)` forgets the last n tokens (a rejected speculative draft).

`Detokenizer` turns one choice's tokens into text a piece at a time, decoding each new token with
the few before it (as vLLM's and mlx-lm's streaming detokenizers do), so that streaming a long
answer costs the same per token at the end as at the start, and the pieces add up to what
decoding the whole answer at once gives."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an unfinished UTF-8 sequence to


class Phase(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


class DecodeState:
    """Token ids [rows, prompt + max_tokens] (left-padded prompts) and mask [rows, virtual + prompt +
    max_tokens] of one generation; `length` ids are filled. `virtual`: soft-prompt positions, which
    come first in the mask (every row sees them) and have no ids. `penalties`: keep counts of each
    row's generated tokens [rows, vocab] (frequency and presence penalties read them)."""

    def __init__(self, rows: list[list[int]], pad_id: int, max_new: int, vocab_size: int, virtual: int = 0,
                 penalties: bool = False):
        count, longest = len(rows), max(len(r) for r in rows)
        self.rows, self.virtual, self.prompt_length = count, virtual, longest
        self.ids = torch.full((count, longest + max_new), pad_id, dtype=torch.long)
        self.mask = torch.ones((count, virtual + longest + max_new), dtype=torch.long)
        for i, row in enumerate(rows):
            self.ids[i, longest - len(row):longest] = torch.tensor(row, dtype=torch.long)
            self.mask[i, virtual:virtual + longest - len(row)] = 0
        self.padded = any(len(r) < longest for r in rows)  # generated positions are never padding
        self.length = longest
        self.counts = torch.zeros(count, vocab_size) if penalties else None
        self.phase = Phase.PREFILL

    @property
    def capacity(self) -> int:
        return self.ids.shape[1]

    @property
    def sequence(self) -> torch.Tensor:
        """Every id fed so far [rows, length] (a view)."""
        return self.ids[:, :self.length]

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """The mask of every position so far [rows, virtual + length], or None when nothing is padding."""
        return self.mask[:, :self.virtual + self.length] if self.padded else None

    @property
    def prompt(self) -> torch.Tensor:
        return self.ids[:, :self.prompt_length]

    def decoding(self) -> None:
        self.phase = Phase.DECODE

    def finish(self) -> None:
        self.phase = Phase.FINISHED

    # ---- on the compute thread (the ends' tick)
    def take(self, tokens: torch.Tensor, eos: torch.Tensor) -> None:
        """Append each row's chosen token [rows]; EOS is not counted for penalties."""
        if self.length >= self.capacity:
            raise RuntimeError(f"a generation of {self.capacity} positions took one more token")
        self.ids[:, self.length] = tokens
        self.length += 1
        if self.counts is not None:
            self.counts[torch.arange(self.rows), tokens] += (~torch.isin(tokens, eos)).to(self.counts.dtype)

    def rollback(self, n: int, eos: torch.Tensor) -> None:
        """Forget the last `n` generated tokens of every row (never the prompt)."""
        if not 0 <= n <= self.length - self.prompt_length:
            raise ValueError(f"cannot roll back {n} of {self.length - self.prompt_length} generated tokens")
        if self.counts is not None:
            for position in range(self.length - n, self.length):
                tokens = self.ids[:, position]
                self.counts[torch.arange(self.rows), tokens] -= (~torch.isin(tokens, eos)).to(self.counts.dtype)
        self.length -= n


class Detokenizer:
    """One choice's text, a piece per token. A new token is decoded together with the tokens since
    the piece before last (its context: a tokenizer that spells a word's leading space or merges
    bytes decodes the same as in the whole); a token that ends inside a UTF-8 character gives
    nothing until the character completes. The pieces of `push` and the final `flush` add up to
    `decode(tokens)`."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.tokens: list[int] = []
        self._prefix = 0  # the context window starts here
        self._read = 0  # tokens before this are in the text given so far

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.tokens)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What the held tokens decode to (U+FFFD for a character that never completed)."""
        if self._read == len(self.tokens):
            return ""
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        self._prefix = self._read = len(self.tokens)
        return after[len(before):]
