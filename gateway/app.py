"""The gateway's ASGI app: OpenAI routes, the registry's routes, and /health."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from gateway.bans import Bans
from gateway.chain import FailoverStats
from gateway.errors import install_handlers
from gateway.generation import SwarmView
from gateway.model import GatewayModel
from gateway.openai_routes import build_router
from gateway.pings import ping_loop
from gateway.registry import Registry, coverage
from gateway.routing import Costs
from gateway.settings import GatewaySettings
from gateway.swarm_routes import build_swarm_router
from shared.compute import ComputeThread
from shared.models.resolve import resolve_model, served_name

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings, registry: Registry | None = None) -> FastAPI:
    swarm = SwarmView(registry or Registry(), Bans(settings.ban_s), FailoverStats(), Costs())
    state = SimpleNamespace(settings=settings, swarm=swarm, model=None, started_at=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        compute = ComputeThread("gateway-compute", settings.num_threads)
        directory = await compute.run(resolve_model, settings.model, settings.cache_dir)  # may convert: torch work
        name = settings.model_name or served_name(settings.model, directory)
        state.model = await compute.run(GatewayModel.load, name, directory, settings.dtype, compute)
        log.info("gateway serving %s (%d layers) from %s", name, state.model.num_layers, directory)
        pings = asyncio.create_task(ping_loop(lambda: swarm.registry.online(name), swarm.costs,
                                              settings.ping_interval_s))
        try:
            yield
        finally:
            pings.cancel()
            await asyncio.gather(pings, return_exceptions=True)
            state.model.close()

    app = FastAPI(title="Corolla gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over a swarm of blockservers.")
    install_handlers(app, settings.retry_after_s)
    app.include_router(build_router(state))
    app.include_router(build_swarm_router(state))

    @app.get("/health")
    async def health():
        """200 when every layer of the model is covered by an online server, else 503."""
        if state.model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        online = state.swarm.registry.online(state.model.name)
        counts = coverage(online, state.model.num_layers)
        missing = [i for i, c in enumerate(counts) if c == 0]
        body = {"status": "ok" if not missing else "degraded", "model": state.model.name,
                "num_layers": state.model.num_layers, "servers": len(online), "coverage": counts,
                "missing_layers": missing, "banned": sorted(swarm.bans.active()),
                "failover": vars(swarm.failovers)}
        return JSONResponse(body, status_code=200 if not missing else 503)

    return app
