"""Turning an OpenAI request body into a generation request: token ids, sampling parameters and
limits, checked against the model. Pure (no app, no sockets): every refusal is a 400 in OpenAI's
shape, raised before anything is reserved on the swarm."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.adapters import PromptAdapter
from gateway.errors import APIError
from gateway.model import GatewayModel
from gateway.sampling import SamplingParams
from gateway.schemas import ChatRequest, CompletionRequest, SamplingFields

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class GenerationRequest:
    prompts: list[list[int]]  # token ids of each prompt
    n: int
    max_tokens: int
    stops: list[str]
    params: SamplingParams
    max_tokens_given: bool = True  # False: a chat's default, "until the context ends" (fit_to_swarm may lower it)
    adapter: PromptAdapter | None = None  # a tuned prompt's model id was asked for

    @property
    def virtual_tokens(self) -> int:
        """Positions the soft prompt takes before every row's tokens."""
        return self.adapter.length if self.adapter is not None else 0

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def max_length(self) -> int:
        """Positions each row may reach: a soft prompt's, the longest prompt and the completion."""
        return self.virtual_tokens + max(len(p) for p in self.prompts) + self.max_tokens


def completion_request(body: CompletionRequest, model: GatewayModel, max_rows: int) -> GenerationRequest:
    unsupported = [f for f, off in (("best_of", lambda v: v in (None, 1)), ("echo", lambda v: v is False),
                                    ("logprobs", lambda v: v is None), ("suffix", lambda v: not v))
                   if not off(getattr(body, f))]
    if unsupported:
        raise APIError(400, f"`{unsupported[0]}` is not supported by this server", param=unsupported[0])
    prompts = prompt_ids(body.prompt, model)
    max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    request = GenerationRequest(prompts, body.n, max_tokens, body.stop or [], sampling(body, model.vocab_size),
                                adapter=model.adapters.get(body.model))
    check_size(request, model.context_length, max_rows, "prompt")
    return request


def chat_request(body: ChatRequest, model: GatewayModel, max_rows: int) -> GenerationRequest:
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "`logprobs` is not supported by this server", param="logprobs")
    for field in ("tools", "functions"):  # a model answering without its tools would mislead the client
        if (body.model_extra or {}).get(field):
            raise APIError(400, f"`{field}` is not supported by this server", param=field)
    if model.chat_template is None:
        raise APIError(400, f"model {model.name} has no chat template; use /v1/completions", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        ids = model.apply_chat_template(messages)
    except Exception as exc:  # jinja templates raise their own errors on unexpected roles/orders
        raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
    adapter = model.adapters.get(body.model)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    room = model.context_length - len(ids) - (adapter.length if adapter is not None else 0)
    max_tokens = limit if limit is not None else max(0, room)
    request = GenerationRequest([ids], body.n, max_tokens, body.stop or [], sampling(body, model.vocab_size),
                                max_tokens_given=limit is not None, adapter=adapter)
    check_size(request, model.context_length, max_rows, "messages")
    return request


def fit_to_swarm(request: GenerationRequest, largest_session: int, param: str) -> None:
    """Refuse (400) a request that no route could ever hold: its rows x (prompt + max_tokens)
    cache tokens exceed, on some layer, every server's whole budget. A chat that gave no limit
    generates until its context ends or that budget would be exceeded, whichever comes first."""
    longest = max(len(p) for p in request.prompts) + request.virtual_tokens
    if not request.max_tokens_given:
        request.max_tokens = min(request.max_tokens, largest_session // request.rows - longest)
        if request.max_tokens >= 1:
            return
    need = request.rows * (longest + max(request.max_tokens, 1))
    if need > largest_session:
        raise APIError(400, f"This request needs {need} KV-cache tokens on every server of its chain ({request.rows} "
                            f"completions x {longest + max(request.max_tokens, 1)} tokens), but the largest budget "
                            f"the swarm offers for some of the model's layers is {largest_session} tokens. Reduce n, "
                            f"the number of prompts, max_tokens or the prompt.", param=param,
                       code="context_length_exceeded")


def prompt_ids(prompt: str | list, model: GatewayModel) -> list[list[int]]:
    """The `prompt` of /v1/completions (a string, strings, token ids, or lists of token ids) as ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if model.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            ids = model.encode(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            out.append(ids)
        else:
            if any(not 0 <= t < model.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {model.vocab_size})", param="prompt")
            out.append(list(p))
    return out


def sampling(body: SamplingFields, vocab_size: int) -> SamplingParams:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab_size:
            raise APIError(400, f"logit_bias token {token} is outside the vocabulary [0, {vocab_size})",
                           param="logit_bias")
        bias[token] = float(value)
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias, seed=body.seed)


def check_size(request: GenerationRequest, context_length: int, max_rows: int, param: str) -> None:
    if request.rows > max_rows:
        raise APIError(400, f"{len(request.prompts)} prompts x n={request.n} = {request.rows} completions; at most "
                            f"{max_rows} per request", param="n")
    longest = max(len(p) for p in request.prompts) + request.virtual_tokens
    if longest + request.max_tokens > context_length:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens. However, you "
                            f"requested {longest + request.max_tokens} tokens ({longest} in the prompt, "
                            f"{request.max_tokens} for the completion). Please reduce the prompt or the "
                            f"completion length.", param=param, code="context_length_exceeded")
