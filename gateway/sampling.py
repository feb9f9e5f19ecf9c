"""Choosing the next token from logits: penalties, logit bias, temperature, nucleus. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax anyway (vLLM's epsilon)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (and so does anything under GREEDY_BELOW)
    top_p: float = 1.0
    top_k: int = 0  # 0: every token (vLLM's extension; -1 is taken as 0 too)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    @cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (token ids, float32 biases), built once per request, not per token."""
        return (torch.tensor(list(self.logit_bias), dtype=torch.long),
                torch.tensor(list(self.logit_bias.values()), dtype=torch.float32))


def adjust_logits(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far, then the logit bias.
    logits, counts: [batch, vocab] (counts of each token in each row's completion)."""
    logits = logits.float().clone()
    if params.frequency_penalty:
        logits -= params.frequency_penalty * counts
    if params.presence_penalty:
        logits -= params.presence_penalty * (counts > 0).float()
    if params.logit_bias:  # one indexed add, however many entries
        tokens, biases = params.bias_tensors
        logits[:, tokens] += biases
    return logits


def choose_tokens(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids."""
    logits = adjust_logits(logits, counts, params)
    if params.temperature < GREEDY_BELOW:  # dividing by 1e-45 would overflow to inf and NaN
        return logits.argmax(-1)
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[:, 0] = False  # top_p 0 keeps the likeliest token alone
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """The model's own log-probabilities (before penalties, bias and temperature, as vLLM and the
    OpenAI API report them): of `tokens` [batch] under `logits` [batch, vocab], and the `top`
    most likely tokens' [batch, top] (values, ids)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    values, ids = logprobs.topk(top, dim=-1) if top > 0 else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, values, ids
