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


def serve(app, name: str, host: str | None = None, port: int | None = None, sock: socket.socket | None = None,
          **config) -> None:
    """Serve `app` until a signal; `sock` is an already bound socket (for port 0)."""
    options = dict(log_level="warning", ws_per_message_deflate=False, timeout_graceful_shutdown=5) | config
    if sock is None:
        options |= {"host": host, "port": port}
    uvicorn_config = uvicorn.Config(app, **options)
    uvicorn_config.app_name = name
    _Server(uvicorn_config).run(sockets=[sock] if sock is not None else None)
