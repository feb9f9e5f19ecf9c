"""The OpenAI-compatible routes: models, completions, chat completions (streamed or not)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from gateway.errors import APIError, from_corolla
from gateway.generation import GenerationRequest, generate
from gateway.model import GatewayModel
from gateway.responses import Stream
from gateway.routing import route_chain
from gateway.sampling import SamplingParams
from gateway.schemas import ChatRequest, CompletionRequest, SamplingFields
from shared.errors import CorollaError

log = logging.getLogger(__name__)


def build_router(state) -> APIRouter:
    """`state` holds settings, registry, model and the start time (see gateway.app)."""

    async def check_api_key(request: Request) -> None:
        key = state.settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {key}":
            shown = given.removeprefix("Bearer ")[:6]
            raise APIError(401, f"Incorrect API key provided: {shown + '…' if shown else '(none)'}",
                           code="invalid_api_key")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def model_card() -> dict:
        model: GatewayModel = state.model
        return {"id": model.name, "object": "model", "created": state.started_at, "owned_by": "corolla",
                "max_model_len": model.context_length}

    @router.get("/models")
    async def list_models():
        """The model this gateway serves."""
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        """One model by id (ids may contain '/')."""
        _check_model(model_id)
        return model_card()

    def _check_model(name: str) -> None:
        if name != state.model.name:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")

    def sampling(body: SamplingFields) -> SamplingParams:
        vocab = state.model.vocab_size
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            token = int(key)
            if not 0 <= token < vocab:
                raise APIError(400, f"logit_bias token {token} is outside the vocabulary [0, {vocab})", param="logit_bias")
            bias[token] = float(value)
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias, seed=body.seed)

    def check_size(prompts: list[list[int]], n: int, max_tokens: int, param: str) -> None:
        model: GatewayModel = state.model
        rows = len(prompts) * n
        if rows > state.settings.max_batch_rows:
            raise APIError(400, f"{len(prompts)} prompts x n={n} = {rows} completions; at most "
                                f"{state.settings.max_batch_rows} per request", param="n")
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > model.context_length:
            raise APIError(400, f"This model's maximum context length is {model.context_length} tokens. However, "
                                f"you requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} "
                                f"for the completion). Please reduce the prompt or the completion length.",
                           param=param, code="context_length_exceeded")

    def prompt_ids(prompt) -> list[list[int]]:
        model: GatewayModel = state.model
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                if model.tokenizer is None:
                    raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
                ids = model.tokenizer(p, add_special_tokens=True).input_ids
                if not ids:
                    raise APIError(400, "prompt must not be empty", param="prompt")
                out.append(ids)
            else:
                if any(not 0 <= t < model.vocab_size for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {model.vocab_size})", param="prompt")
                out.append(list(p))
        return out

    def ensure_chain() -> None:
        """Fail with 503 before any streaming starts when no chain covers the model."""
        try:
            route_chain(state.swarm.registry.online(state.model.name), state.model.num_layers,
                        state.swarm.bans.active(), costs=state.swarm.costs)
        except CorollaError as exc:
            raise from_corolla(exc, state.settings.retry_after_s) from exc

    @router.post("/completions")
    async def completions(body: CompletionRequest):
        """Text completions (legacy API), streamed as server-sent events when `stream` is true."""
        _check_model(body.model)
        if body.best_of not in (None, 1) or body.echo or body.logprobs or body.suffix:
            field = next(f for f in ("best_of", "echo", "logprobs", "suffix") if getattr(body, f) not in (None, 1, False, 0))
            raise APIError(400, f"`{field}` is not supported by this server", param=field)
        prompts = prompt_ids(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        check_size(prompts, body.n, max_tokens, "prompt")
        request = GenerationRequest(prompts, body.n, max_tokens, body.stop or [], sampling(body))
        ensure_chain()
        stream = Stream("cmpl", state.model.name, len(prompts) * body.n, body)
        if body.stream:
            return sse(stream.completion_chunks(events(request)))
        return await stream.completion(events(request))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        """Chat completions: messages rendered with the model's chat template."""
        _check_model(body.model)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "`logprobs` is not supported by this server", param="logprobs")
        for field in ("tools", "functions"):  # a model answering without its tools would mislead the client
            if (body.model_extra or {}).get(field):
                raise APIError(400, f"`{field}` is not supported by this server", param=field)
        model: GatewayModel = state.model
        if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
            raise APIError(400, f"model {model.name} has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]
        except Exception as exc:  # jinja templates raise their own errors on unexpected roles/orders
            raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = limit if limit is not None else max(0, model.context_length - len(ids))
        check_size([ids], body.n, max_tokens, "messages")
        request = GenerationRequest([ids], body.n, max_tokens, body.stop or [], sampling(body))
        ensure_chain()
        stream = Stream("chatcmpl", model.name, body.n, body)
        if body.stream:
            return sse(stream.chat_chunks(events(request)))
        return await stream.chat(events(request))

    # the design card's name for the same route
    router.add_api_route("/chat", chat_completions, methods=["POST"], summary="Alias of /v1/chat/completions")

    def events(request: GenerationRequest):
        return generate(request, state.model, state.swarm, state.settings)

    def sse(chunks: AsyncIterator[dict]) -> EventSourceResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield {"data": json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))}
            except CorollaError as exc:
                log.warning("stream failed: %s", exc.message)
                yield {"data": json.dumps(from_corolla(exc, state.settings.retry_after_s).body())}
            except Exception:
                log.exception("stream failed")
                yield {"data": json.dumps(APIError(500, "The server had an error while processing your request.",
                                                   "server_error").body())}
            yield {"data": "[DONE]"}

        return EventSourceResponse(body(), sep="\n", ping=15)

    return router
