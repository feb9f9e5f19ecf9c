"""What one request may cost before it is refused: the body's size (413, counted as it arrives,
never buffered past the limit) and a size check on prompt text that needs no tokenizer (a prompt
whose characters could not fit in the context even at the vocabulary's longest token is refused
before the tokenizer spends seconds on it)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from gateway.errors import APIError


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 in OpenAI's shape, from its
    Content-Length when it declares one, else as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            too_big = False  # h11 refuses a malformed Content-Length before we see it
        if too_big:
            return await self._refuse(send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge(self.message)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except TooLarge:
            if not started:
                await self._refuse(send)

    @property
    def message(self) -> str:
        return f"The request body is larger than this server's limit of {self.max_bytes / 2**20:g} MiB."

    async def _refuse(self, send) -> None:
        body = json.dumps(APIError(413, self.message, code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class TooLarge(HTTPException):
    """Raised from inside the body's reading: FastAPI passes an HTTPException on as it is, so the
    app's handler answers 413 (a plain exception would become its generic 400)."""

    def __init__(self, message: str):
        super().__init__(413, message)


def check_text_fits(texts: list[str], context_length: int, max_token_chars: int, param: str) -> None:
    """A text of more characters than `context_length` tokens of the longest vocabulary entry can
    hold can never fit: refuse it without tokenizing (400, as a context overflow is)."""
    longest = max((len(t) for t in texts), default=0)
    if longest > context_length * max_token_chars:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens; this {param} has "
                            f"{longest} characters, more than that many tokens can hold.", param=param,
                       code="context_length_exceeded")
