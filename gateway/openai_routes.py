"""The OpenAI-compatible routes: models, completions, chat completions (streamed or not)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette.sse import EventSourceResponse, SendTimeoutError

from gateway.errors import APIError, from_corolla
from gateway.generation import Generation
from gateway.requests import GenerationRequest, chat_request, completion_request, fit_to_swarm
from gateway.responses import OpenAIShaper
from gateway.schemas import ChatRequest, CompletionRequest
from gateway.state import GatewayState, ModelDep, StateDep, check_api_key
from shared.errors import CorollaError

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


def model_card(state: GatewayState, name: str | None = None) -> dict:
    """The base model's card, or a tuned prompt's (`root`/`parent` name the base, as vLLM does)."""
    model = state.model
    card = {"id": name or model.name, "object": "model", "created": state.started_at, "owned_by": "corolla",
            "max_model_len": model.context_length}
    if name is not None and name != model.name:
        card |= {"root": model.name, "parent": model.name}
    return card


def check_model(name: str, state: GatewayState) -> None:
    if name != state.model.name and name not in state.model.adapters:
        raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")


@router.get("/models")
async def list_models(state: StateDep, _: ModelDep):
    """The model this gateway serves, and the tuned prompts it serves as models of their own."""
    return {"object": "list", "data": [model_card(state)] + [model_card(state, a) for a in state.model.adapters]}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, state: StateDep, _: ModelDep):
    """One model by id (ids may contain '/')."""
    check_model(model_id, state)
    return model_card(state, model_id)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep, model: ModelDep):
    """Text completions (legacy API), streamed as server-sent events when `stream` is true."""
    check_model(body.model, state)
    generation = await state.prepare(completion_request, body, model, state.settings.max_batch_rows)
    return await respond(generation, body, request, state, chat=False)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: StateDep, model: ModelDep):
    """Chat completions: messages rendered with the model's chat template."""
    check_model(body.model, state)
    generation = await state.prepare(chat_request, body, model, state.settings.max_batch_rows)
    return await respond(generation, body, request, state, chat=True)


# the design card's name for the same route
router.add_api_route("/chat", chat_completions, methods=["POST"], summary="Alias of /v1/chat/completions")


async def respond(wanted: GenerationRequest, body: CompletionRequest | ChatRequest, request: Request,
                  state: GatewayState, chat: bool):
    """Admit the generation (it may wait in the queue; 429 or 503 are answered before anything is
    streamed), run it, and answer in the route's shape: chunks of an event stream, or whole. A
    client that goes away ends its generation within a step and frees every hop."""
    started = time.monotonic()
    ensure_chain(state)
    fit_to_swarm(wanted, state.swarm.largest_session(), "messages" if chat else "prompt")
    generation = Generation(wanted, state.model, state.swarm, state.chain_config, state.connect, state.admission)
    shaper = OpenAIShaper("chatcmpl" if chat else "cmpl", body.model, wanted.rows, body, scored=wanted.scored,
                          token_text=state.model.token_text, n=wanted.keep or wanted.n,
                          best_of=wanted.n if wanted.keep else None, tools=wanted.tools)
    try:
        await until_disconnected(request, generation.start())
        events = state.metrics.observe(generation.events(), started)
        if body.stream:
            return sse(shaper.chat_chunks(events) if chat else shaper.completion_chunks(events), state)
        return await until_disconnected(request, shaper.chat(events) if chat else shaper.completion(events))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed the request"
    except BaseException:
        await generation.close()
        raise


class ClientGone(Exception):
    pass


T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) as soon as the HTTP client disconnects."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        log.info("client went away; ending its generation")
        raise ClientGone()
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


async def _disconnect(request: Request) -> None:
    """Returns when the ASGI server reports the client gone (the body is already read, so the
    only message left to receive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def ensure_chain(state: GatewayState) -> None:
    """Fail with 503 before any streaming starts when no chain covers the model."""
    try:
        state.swarm.route()
    except CorollaError as exc:
        raise from_corolla(exc, state.settings.retry_after_s) from exc


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

    # A client that stops reading for send_timeout is dropped: its generation ends and frees its hops.
    return EventStream(body(), sep="\n", ping=15, send_timeout=state.settings.stream_send_timeout_s)


class EventStream(EventSourceResponse):
    """Server-sent events whose slow readers are dropped quietly (their generation is cancelled and
    cleans up after itself): an expected outcome, not an unhandled error."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("a streaming client read nothing for %.0fs; dropped", self.send_timeout)
