"""Running an ASGI app under uvicorn the way a command-line server should stop: Ctrl-C or SIGTERM
shuts down gracefully and exits without a traceback (uvicorn re-raises the signal after its
graceful shutdown, which prints one from every task it cancels); a signal while the app is still
starting (loading a model can take minutes) exits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading

import uvicorn

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if not self.started:
            print(f"{self.config.app_name}: stopped while starting", file=sys.stderr, flush=True)
            os._exit(128 + sig)
        self.handle_exit(sig, frame)


HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this (slowloris)
KEEP_ALIVE_S = 15.0  # an idle kept-alive connection is closed after this


def with_header_deadline(protocol: type, timeout_s: float) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request headers are not complete within
    `timeout_s` of its opening or of its previous response (uvicorn itself waits forever for them).
    A connection upgraded to a WebSocket has left the protocol and is not touched."""

    class Deadline(protocol):
        def _arm(self) -> None:
            self._awaiting = self.cycle  # headers are complete when a new cycle replaces this one
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            if self.cycle is self._awaiting and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._awaiting:
                self._deadline.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

    Deadline.__name__ = f"{protocol.__name__}WithHeaderDeadline"
    return Deadline


def http_protocol() -> type:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as protocol
    return with_header_deadline(protocol, HEADER_TIMEOUT_S)


def serve(app, name: str, host: str | None = None, port: int | None = None, sock: socket.socket | None = None,
          max_connections: int | None = None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          **config) -> None:
    """Serve `app` until a signal; `sock` is an already bound socket (for port 0). Beyond
    `max_connections` open connections, new requests get 503; with a certificate and key it
    serves https and wss."""
    options = dict(log_level="warning", ws_per_message_deflate=False, timeout_graceful_shutdown=5,
                   http=http_protocol(), timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=max_connections,
                   ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile) | config
    if sock is None:
        options |= {"host": host, "port": port}
    uvicorn_config = uvicorn.Config(app, **options)
    uvicorn_config.app_name = name
    _Server(uvicorn_config).run(sockets=[sock] if sock is not None else None)
