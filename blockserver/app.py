"""The blockserver's ASGI app: the WebSocket session endpoint, /health, and the service's loops."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse

from blockserver.service import Blockserver
from blockserver.sessions import SessionHandler
from blockserver.settings import BlockserverSettings
from shared import corolla_version
from shared.loops import TaskSet
from shared.metrics import metrics_response

log = logging.getLogger(__name__)


def create_app(settings: BlockserverSettings, url: str) -> FastAPI:
    """`url` is the address announced to gateways (the public URL, or where this server listens)."""
    service = Blockserver(settings, url)
    handler = SessionHandler(service, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = TaskSet()
        try:
            service.start_loops(tasks)  # heartbeats go out while loading, so `joining` stays fresh
            await service.start()
            if service.fixed_span is None:
                service.start_rebalancing(tasks)
            yield
        finally:
            await tasks.stop()
            await service.close()

    app = FastAPI(title="Corolla blockserver", version=corolla_version(), lifespan=lifespan)
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
        scheduler = service.runtime.scheduler
        return info.model_dump(mode="json") | {"status": "ok", "sessions_opened": service.runtime.sessions_opened,
                                               "ticks": scheduler.ticks, "steps": scheduler.items}

    @app.get("/metrics")
    async def metrics():
        """Prometheus metrics (text exposition format)."""
        return metrics_response(service.metrics.registry)

    return app
