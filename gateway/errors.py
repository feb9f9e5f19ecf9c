"""OpenAI-shaped errors, produced in one place: `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import BadRequest, CorollaError, ModelNotFound, Overloaded, Unavailable

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# where a blockserver listens is the swarm's business, not an API client's: addresses are cut from
# every message a client gets (the gateway's log keeps them)
_ADDRESS = re.compile(r"\b(?:https?|wss?)://[^\s'\"),;]*[^\s'\"),;:.]|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")


def redact(message: str) -> str:
    return _ADDRESS.sub("<server>", message)


def from_corolla(exc: CorollaError, retry_after_s: int) -> APIError:
    """The HTTP face of our own exceptions."""
    message = redact(exc.message)
    if isinstance(exc, BadRequest):
        return APIError(400, message, code=exc.code)
    if isinstance(exc, ModelNotFound):
        return APIError(404, message, code="model_not_found")
    if isinstance(exc, Overloaded):
        return APIError(429, f"The engine is currently overloaded, please try again later ({message}).",
                        "server_error", code="overloaded", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, Unavailable):
        return APIError(503, f"The model is unavailable: {message}", "server_error", code="service_unavailable",
                        headers={"Retry-After": str(retry_after_s)})
    return APIError(500, "The server had an error while processing your request.", "server_error")


def install_handlers(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(CorollaError)
    async def corolla_error(request: Request, exc: CorollaError):
        return await api_error(request, from_corolla(exc, retry_after_s))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, param = "We could not parse the JSON body of your request.", None
        else:
            message = f"{first.get('msg', 'invalid request')}" + (f" (at {param})" if param else "")
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type_, code=code).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, "The server had an error while processing your request.",
                                     "server_error").body(), status_code=500)
