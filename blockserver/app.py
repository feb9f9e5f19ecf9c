"""The blockserver's ASGI app: the WebSocket session endpoint, /health, and the heartbeat loop."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse

from blockserver.heartbeat import heartbeat_loop
from blockserver.runtime import Runtime
from blockserver.sessions import SessionHandler
from blockserver.settings import BlockserverSettings
from shared.compute import ComputeThread
from shared.models.loader import load_span
from shared.models.resolve import resolve_model, served_name
from shared.protocol import DTYPE_NAMES
from shared.records import ServerInfo, ServerState, Span

log = logging.getLogger(__name__)
VERSION = "0.1.0"


def create_app(settings: BlockserverSettings, url: str) -> FastAPI:
    """`url` is the address announced to gateways (the public URL, or where this server listens)."""
    span_wanted = Span.parse(settings.blocks)
    server_id = settings.server_id or f"bs-{uuid.uuid4().hex[:10]}"
    state: dict = {"runtime": None, "handler": None}

    def info() -> ServerInfo:
        runtime: Runtime = state["runtime"]
        return ServerInfo(
            server_id=server_id, url=url, model=state["model_name"], start=span_wanted.start, end=span_wanted.end,
            state=ServerState.online, cache_tokens_left=runtime.cache_tokens_left, sessions=len(runtime.sessions),
            dtype=DTYPE_NAMES[runtime.span.dtype], version=VERSION, ttl_s=3 * settings.heartbeat_interval_s,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        compute = ComputeThread("compute", settings.num_threads)
        model_dir = await compute.run(resolve_model, settings.model, settings.cache_dir)  # may convert: torch work
        state["model_name"] = settings.model_name or served_name(settings.model, model_dir)

        def progress(done: int, total: int) -> None:
            print(f"blockserver {server_id}: loading layers {span_wanted}: {done}/{total}", file=sys.stderr, flush=True)

        span = await compute.run(load_span, model_dir, span_wanted.start, span_wanted.end,
                                 settings.device, settings.dtype, progress)
        runtime = Runtime(span, settings.cache_tokens, compute)
        state["runtime"] = runtime
        state["handler"] = SessionHandler(runtime, state["model_name"], span.dtype, settings)
        heartbeat = asyncio.create_task(heartbeat_loop(settings.gateways, info, settings.heartbeat_interval_s))
        log.info("blockserver %s serving %s layers %s at %s", server_id, state["model_name"], span_wanted, url)
        try:
            yield
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await runtime.shutdown()
            compute.shutdown()

    app = FastAPI(title="Corolla blockserver", version=VERSION, lifespan=lifespan)

    @app.websocket("/ws")
    async def session(ws: WebSocket):
        """An inference session: open, step…, close (binary frames, see shared/protocol.py)."""
        await state["handler"].serve(ws)

    @app.get("/health")
    async def health():
        """200 with the span and free cache once the span is loaded."""
        runtime: Runtime | None = state["runtime"]
        if runtime is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return info().model_dump(mode="json") | {"status": "ok"}

    return app
