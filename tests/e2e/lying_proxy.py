"""A blockserver that lies, made of an honest one and a proxy in front of it: the proxy forwards
/health and the WebSocket sessions, and adds noise to every hidden state the server returns (the
server announces the proxy as its --public-url). Runs its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading

import httpx
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from shared import protocol


class LyingProxy:
    def __init__(self, upstream_port: int, port: int, noise: float = 0.5):
        self.upstream_port, self.port, self.noise = upstream_port, port, noise
        self.lies = 0  # results altered so far
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LyingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = self._loop.create_future()
        async with httpx.AsyncClient(timeout=5) as http:
            async def health(connection, request):
                if request.path.startswith("/ws"):
                    return None  # a WebSocket: handled below
                try:
                    r = await http.get(f"http://127.0.0.1:{self.upstream_port}{request.path}")
                except httpx.HTTPError:
                    return connection.respond(502, "upstream down\n")
                return Response(r.status_code, r.reason_phrase, Headers({"Content-Type": "application/json"}),
                                r.content)

            async with serve(self._session, "127.0.0.1", self.port, process_request=health, compression=None,
                             max_size=2**26):
                self._ready.set()
                await self._stop

    async def _session(self, client) -> None:
        try:
            async with connect(f"ws://127.0.0.1:{self.upstream_port}/ws", compression=None,
                               max_size=2**26) as upstream:
                async def up():
                    async for frame in client:
                        await upstream.send(frame)
                    await upstream.close()

                async def down():
                    async for frame in upstream:
                        await client.send(self._alter(frame))

                await asyncio.gather(up(), down())
        except (ConnectionClosed, OSError):
            pass

    def _alter(self, frame: bytes) -> bytes:
        message = protocol.decode(frame, 2**26)
        hidden = message.tensors.get("hidden")
        if not isinstance(message.header, protocol.Result) or hidden is None:
            return frame
        self.lies += 1
        noisy = hidden + self.noise * hidden.float().std().to(hidden.dtype)
        return protocol.encode(message.header, message.tensors | {"hidden": noisy})
