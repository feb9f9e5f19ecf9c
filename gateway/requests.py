"""Turning an OpenAI request body into a generation request: token ids, sampling parameters and
limits, checked against the model. Pure (no app, no sockets): every refusal is a 400 in OpenAI's
shape, raised before anything is reserved on the swarm."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.adapters import PromptAdapter
from gateway.errors import APIError
from gateway.grammar import response_format_grammar
from gateway.limits import check_text_fits
from gateway.model import GatewayModel
from gateway.sampling import SamplingParams
from gateway.schemas import ChatRequest, CompletionRequest, SamplingFields
from gateway.tools import ToolPlan, plan, render

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGPROBS = 20  # alternatives per position (OpenAI allows 20 in chat, 5 in completions; vLLM 20)


@dataclass
class GenerationRequest:
    prompts: list[list[int]]  # token ids of each prompt
    n: int
    max_tokens: int
    stops: list[str]
    params: SamplingParams
    max_tokens_given: bool = True  # False: a chat's default, "until the context ends" (fit_to_swarm may lower it)
    adapter: PromptAdapter | None = None  # a tuned prompt's model id was asked for
    logprobs: int | None = None  # score every token, with this many alternatives; None: no scores
    echo: bool = False  # each choice's text (and scores) begin with its prompt
    prompt_texts: list[str] | None = None  # what echo shows of each prompt
    keep: int | None = None  # best_of: of the n rows generated per prompt, return this many, the most likely
    scored: bool = False  # the client asked for log-probabilities (best_of scores rows for itself)
    grammar: str | None = None  # every row's output is constrained to it (gateway/grammar.py)
    tools: ToolPlan | None = None  # tool calls are parsed from (or forced on) the output

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
    if body.suffix:
        raise APIError(400, "`suffix` (fill-in-the-middle) is not supported by this server", param="suffix")
    check_logprobs(body.logprobs, "logprobs")
    rows, kept = body.n, None
    if body.best_of is not None:
        if body.best_of < body.n:
            raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})", param="best_of")
        if body.stream and body.best_of > body.n:
            raise APIError(400, "best_of greater than n cannot be streamed", param="best_of")
        rows, kept = body.best_of, (body.n if body.best_of > body.n else None)
    check_prompt_cost(body, model, rows, max_rows)
    prompts = prompt_ids(body.prompt, model)
    max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    texts = body.prompt if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else (
        [body.prompt] if isinstance(body.prompt, str) else [model.decode(p, special=True) for p in prompts])
    logprobs = body.logprobs if body.logprobs is not None else (0 if kept else None)  # best_of ranks by score
    request = GenerationRequest(prompts, rows, max_tokens, body.stop or [], sampling(body, model),
                                adapter=model.adapters.get(body.model), logprobs=logprobs, echo=body.echo,
                                prompt_texts=texts, keep=kept, scored=body.logprobs is not None,
                                grammar=response_format_grammar(body.response_format, model.grammars))
    check_size(request, model.context_length, max_rows, "prompt")
    return request


def check_logprobs(top: int | None, param: str) -> None:
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(400, f"`{param}` must be between 0 and {MAX_LOGPROBS}, got {top}", param=param)


def chat_request(body: ChatRequest, model: GatewayModel, max_rows: int) -> GenerationRequest:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "`top_logprobs` needs `logprobs` set to true", param="top_logprobs")
    check_logprobs(body.top_logprobs, "top_logprobs")
    for field in ("tools", "functions"):  # a model answering without its tools would mislead the client
        if (body.model_extra or {}).get(field):
            raise APIError(400, f"`{field}` is not supported by this server", param=field)
    if model.chat_template is None:
        raise APIError(400, f"model {model.name} has no chat template; use /v1/completions", param="messages")
    check_text_fits(["".join(m.text() for m in body.messages)], model.context_length, model.max_token_chars,
                    "messages")
    tools = plan(body.tools, body.tool_choice, model.chat_template)
    if tools is not None and tools.forced and body.response_format not in (None, {"type": "text"}):
        raise APIError(400, "a forced tool_choice and a response_format cannot both shape the output",
                       param="response_format")
    messages, rendered_tools = render([m.for_template() for m in body.messages],
                                      body.tools if tools is not None else None, model.chat_template)
    try:
        ids = model.apply_chat_template(messages, rendered_tools)
    except Exception as exc:  # jinja templates raise their own errors on unexpected roles/orders
        raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
    if tools is not None and tools.forced:
        grammar = model.grammars.json_schema(tools.forced_schema(), "tools")
    else:
        grammar = response_format_grammar(body.response_format, model.grammars)
    adapter = model.adapters.get(body.model)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    room = model.context_length - len(ids) - (adapter.length if adapter is not None else 0)
    max_tokens = limit if limit is not None else max(0, room)
    request = GenerationRequest([ids], body.n, max_tokens, body.stop or [], sampling(body, model),
                                max_tokens_given=limit is not None, adapter=adapter,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                scored=bool(body.logprobs), grammar=grammar, tools=tools)
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


def check_prompt_cost(body: CompletionRequest, model: GatewayModel, rows_per_prompt: int, max_rows: int) -> None:
    """The checks that need no tokenizer, before it runs: how many rows, and whether each prompt
    string could fit at all."""
    prompt = body.prompt
    count = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
    if count * rows_per_prompt > max_rows:
        raise APIError(400, f"{count} prompts x {rows_per_prompt} completions = {count * rows_per_prompt}; at most "
                            f"{max_rows} per request", param="n")
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    check_text_fits(texts, model.context_length, model.max_token_chars, "prompt")


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


def sampling(body: SamplingFields, model: GatewayModel) -> SamplingParams:
    """The request's sampling parameters; those it omits come from the model's generation_config
    (GatewayModel.sampling_defaults), then OpenAI's defaults."""
    vocab_size, defaults = model.vocab_size, model.sampling_defaults

    def given(name: str, fallback: float) -> float:
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, fallback)
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab_size:
            raise APIError(400, f"logit_bias token {token} is outside the vocabulary [0, {vocab_size})",
                           param="logit_bias")
        bias[token] = float(value)
    return SamplingParams(
        temperature=given("temperature", 1.0), top_p=given("top_p", 1.0), top_k=max(0, int(given("top_k", 0))),
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
