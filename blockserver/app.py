"""The blockserver's ASGI app: the WebSocket session endpoint, /health, and the service's loops."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse

from blockserver.service import VERSION, Blockserver
from blockserver.sessions import SessionHandler
from blockserver.settings import BlockserverSettings

log = logging.getLogger(__name__)


def create_app(settings: BlockserverSettings, url: str) -> FastAPI:
    """`url` is the address announced to gateways (the public URL, or where this server listens)."""
    service = Blockserver(settings, url)
    handler = SessionHandler(service, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        heartbeat = asyncio.create_task(service.heartbeat_loop())
        tasks = [heartbeat]
        try:
            await service.start()
            if service.fixed_span is None:
                tasks.append(asyncio.create_task(service.rebalance_loop()))
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await service.close()

    app = FastAPI(title="Corolla blockserver", version=VERSION, lifespan=lifespan)
    app.state.service = service

    @app.websocket("/ws")
    async def session(ws: WebSocket):
        """An inference session: open, step…, close (binary frames, see shared/protocol.py)."""
        await handler.serve(ws)

    @app.get("/health")
    async def health():
        """200 with the span, state and free cache once a span is loaded; 503 while loading or moving."""
        info = service.info()
        if info is None or service.runtime is None:
            return JSONResponse({"status": "loading", "state": service.state.value}, status_code=503)
        return info.model_dump(mode="json") | {"status": "ok", "sessions_opened": service.runtime.sessions_opened}

    return app
