"""The gateway's ASGI app: OpenAI routes, the registry's routes, and /health."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from gateway.admission import Admission
from gateway.channel import Connect, websocket_connect
from gateway.errors import install_handlers
from gateway.limits import BodyLimit
from gateway.membership import Membership
from gateway.metrics import GatewayMetrics, RequestMetrics
from gateway.model import GatewayModel
from gateway.openai_routes import router as openai_router
from gateway.settings import GatewaySettings
from gateway.state import GatewayState, StateDep
from gateway.swarm import ServedModel, Swarm
from gateway.swarm_routes import router as swarm_router
from gateway.verify import Verifier
from shared import corolla_version
from shared.compute import ComputeThread
from shared.identity import Identity
from shared.loops import TaskSet, every
from shared.metrics import metrics_response
from shared.models.resolve import resolve_model, served_name

log = logging.getLogger(__name__)


async def compile_head(model, compute: ComputeThread) -> None:
    """Compile the LM head before serving; a head that cannot be compiled runs eagerly."""
    started = time.monotonic()
    print("gateway: compiling the LM head (once per start; --no-compile skips it)", file=sys.stderr, flush=True)
    try:
        await compute.run(model.ends.compile_head)
    except Exception as exc:
        log.warning("gateway: compiling the LM head failed (%s: %s); it runs eagerly", type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "")
        return
    log.info("gateway: LM head compiled in %.0fs (row buckets %s)", time.monotonic() - started,
             list(model.ends.compiled_head.buckets))


def create_app(settings: GatewaySettings, swarm: Swarm | None = None, connect: Connect = websocket_connect) -> FastAPI:
    """`swarm` and `connect` are seams for tests (an aged registry, in-process blockservers)."""
    state = GatewayState(settings, swarm or Swarm(settings.ban_s),
                         Admission(settings.max_queue, settings.queue_timeout_s), connect)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        compute = ComputeThread("gateway-compute", settings.num_threads)
        directory = await compute.run(resolve_model, settings.model, settings.cache_dir)  # may convert: torch work
        name = settings.model_name or served_name(settings.model, directory)
        model = await compute.run(GatewayModel.load, name, directory, settings.dtype, compute, settings.batch_linger_s,
                                  settings.prompt_adapters, settings.generation_config)
        model.batch_invariant = settings.batch_invariant
        if settings.compile:
            await compile_head(model, compute)
        state.swarm.model = ServedModel(model.facts.fingerprint, name, model.num_layers)
        state.model = model
        log.info("gateway serving %s (%d layers) from %s", state.swarm.model.describe(), model.num_layers, directory)
        tasks = TaskSet()
        async with httpx.AsyncClient() as pinger:  # no swarm secret here: it must not reach peer URLs
            tasks.start(every("ping", settings.ping_interval_s, lambda: state.swarm.ping(pinger)), "ping")
            try:
                yield
            finally:
                await tasks.stop()
                await model.close()
                state.prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Corolla gateway", version=corolla_version(), lifespan=lifespan,
                  description="OpenAI-compatible API over a swarm of blockservers.")
    app.state.gateway = state
    state.membership = Membership(Identity.load_or_create(settings.identity_file, "gw"), settings.swarm_secret,
                                  settings.max_servers_per_source, settings.max_servers)
    state.swarm.grant = state.membership.grant
    if settings.verify_rate > 0:
        state.swarm.verifier = Verifier(settings.verify_rate, state.swarm, connect, state.chain_config)
    state.metrics = GatewayMetrics(state)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mib * 2**20))
    install_handlers(app, settings.retry_after_s)
    app.include_router(openai_router)
    app.include_router(swarm_router)

    @app.get("/health")
    async def health(state: StateDep):
        """200 when every layer of the model is covered by an online server that is not banned;
        503 ("degraded") when some layer has none."""
        if state.model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        swarm = state.swarm
        counts = swarm.coverage(routable_only=True)
        missing = [i for i, c in enumerate(counts) if c == 0]
        body = {"status": "ok" if not missing else "degraded", "model": state.model.name,
                "fingerprint": state.model.facts.fingerprint, "num_layers": state.model.num_layers,
                "servers": len(swarm.online()), "coverage": counts, "missing_layers": missing,
                "banned": sorted(swarm.bans.active()), "queued": state.admission.waiting,
                "failover": asdict(swarm.failovers),
                "verification": asdict(swarm.verifier.stats) if swarm.verifier is not None else None}
        return JSONResponse(body, status_code=200 if not missing else 503)

    @app.get("/metrics")
    async def metrics():
        """Prometheus metrics (text exposition format). Open like vLLM's: put it behind your network's
        scraper rules, not the API key."""
        return metrics_response(state.metrics.registry)

    return app
