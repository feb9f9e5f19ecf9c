"""What the gateway's routes share, typed, and the FastAPI dependencies that hand it to them."""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from gateway.admission import Admission
from gateway.chain import ChainConfig
from gateway.channel import Connect, websocket_connect
from gateway.errors import APIError
from gateway.membership import Membership
from gateway.model import GatewayModel
from gateway.settings import GatewaySettings
from gateway.swarm import Swarm

T = TypeVar("T")


@dataclass
class GatewayState:
    settings: GatewaySettings
    swarm: Swarm
    admission: Admission
    connect: Connect = websocket_connect  # the chain's seam (tests connect in-process servers)
    model: GatewayModel | None = None  # None while loading
    started_at: int = field(default_factory=lambda: int(time.time()))
    metrics: object | None = None  # gateway.metrics.GatewayMetrics, set by the app
    membership: Membership | None = None  # who may join; grants sessions (set by the app)
    # tokenizing, chat templates and grammar compilation: seconds of work for a big request, kept
    # off the event loop (heartbeats, other streams) and done one request at a time
    prep: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "gateway-prep"))

    async def prepare(self, work: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.prep, work, *args)

    @property
    def chain_config(self) -> ChainConfig:
        return ChainConfig.of(self.settings)


async def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


async def get_model(state: Annotated[GatewayState, Depends(get_state)]) -> GatewayModel:
    if state.model is None:
        raise APIError(503, "The model is still loading; retry shortly.", "server_error", code="loading",
                       headers={"Retry-After": str(state.settings.retry_after_s)})
    return state.model


def _given_key(request: Request) -> tuple[str, str]:
    """(scheme, key) of the Authorization header: 'Bearer KEY', or 'Basic' with KEY as the password
    (how a browser asks for it on the /swarm page)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    scheme, given = scheme.lower(), given.strip()
    if scheme == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            given = ""
    return scheme, given


async def check_api_key(request: Request, state: Annotated[GatewayState, Depends(get_state)]) -> None:
    key = state.settings.api_key
    if not key:
        return
    scheme, given = _given_key(request)
    if scheme not in ("bearer", "basic") or not hmac.compare_digest(given.encode(), key.encode()):
        shown = given[:6]
        # a browser shows its password prompt for Basic (the key as password, any user name)
        raise APIError(401, f"Incorrect API key provided: {shown + '…' if shown else '(none)'}",
                       code="invalid_api_key", headers={"WWW-Authenticate": 'Basic realm="corolla", charset="UTF-8"'})


StateDep = Annotated[GatewayState, Depends(get_state)]
ModelDep = Annotated[GatewayModel, Depends(get_model)]
