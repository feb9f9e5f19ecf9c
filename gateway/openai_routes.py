"""The OpenAI-compatible routes: models, completions, chat completions (streamed or not)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from sse_starlette.sse import EventSourceResponse

from gateway.errors import APIError, from_corolla
from gateway.generation import Event, generate
from gateway.requests import GenerationRequest, chat_request, completion_request
from gateway.responses import OpenAIShaper
from gateway.schemas import ChatRequest, CompletionRequest
from gateway.state import GatewayState, ModelDep, StateDep, check_api_key
from shared.errors import CorollaError

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


def model_card(state: GatewayState) -> dict:
    model = state.model
    return {"id": model.name, "object": "model", "created": state.started_at, "owned_by": "corolla",
            "max_model_len": model.context_length}


def check_model(name: str, state: GatewayState) -> None:
    if name != state.model.name:
        raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")


@router.get("/models")
async def list_models(state: StateDep, _: ModelDep):
    """The model this gateway serves."""
    return {"object": "list", "data": [model_card(state)]}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, state: StateDep, _: ModelDep):
    """One model by id (ids may contain '/')."""
    check_model(model_id, state)
    return model_card(state)


@router.post("/completions")
async def completions(body: CompletionRequest, state: StateDep, model: ModelDep):
    """Text completions (legacy API), streamed as server-sent events when `stream` is true."""
    check_model(body.model, state)
    return await respond(completion_request(body, model, state.settings.max_batch_rows), body, state, chat=False)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, state: StateDep, model: ModelDep):
    """Chat completions: messages rendered with the model's chat template."""
    check_model(body.model, state)
    return await respond(chat_request(body, model, state.settings.max_batch_rows), body, state, chat=True)


# the design card's name for the same route
router.add_api_route("/chat", chat_completions, methods=["POST"], summary="Alias of /v1/chat/completions")


async def respond(request: GenerationRequest, body: CompletionRequest | ChatRequest, state: GatewayState, chat: bool):
    """Run the generation and answer in the route's shape: chunks of an event stream, or whole."""
    ensure_chain(state)
    shaper = OpenAIShaper("chatcmpl" if chat else "cmpl", state.model.name, request.rows, body)
    stream = events(request, state)
    if body.stream:
        return sse(shaper.chat_chunks(stream) if chat else shaper.completion_chunks(stream), state)
    return await (shaper.chat(stream) if chat else shaper.completion(stream))


def ensure_chain(state: GatewayState) -> None:
    """Fail with 503 before any streaming starts when no chain covers the model."""
    try:
        state.swarm.route()
    except CorollaError as exc:
        raise from_corolla(exc, state.settings.retry_after_s) from exc


def events(request: GenerationRequest, state: GatewayState) -> AsyncIterator[Event]:
    return generate(request, state.model, state.swarm, state.chain_config, state.connect)


def sse(chunks: AsyncIterator[dict], state: GatewayState) -> EventSourceResponse:
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
