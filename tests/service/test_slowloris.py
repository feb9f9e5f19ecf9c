"""A connection that never finishes its request headers is closed, on the server Corolla runs
(uvicorn with shared.serving's protocol), while normal requests and kept-alive connections go on."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from shared.serving import http_protocol, with_header_deadline
from tests.e2e.swarm import free_port


@pytest.fixture
def server():
    app = FastAPI()

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    port = free_port()
    protocol = with_header_deadline(http_protocol().__mro__[1], 0.5)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning",
                            limit_concurrency=64, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_unfinished_headers_are_cut_off_and_others_are_served(server):
    with socket.create_connection(("127.0.0.1", server)) as silent, \
            socket.create_connection(("127.0.0.1", server)) as dribbling:
        _slowloris(server, silent, dribbling)


def _slowloris(server, silent, dribbling):
    dribbling.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
    with httpx.Client(base_url=f"http://127.0.0.1:{server}") as client:
        for _ in range(3):  # a kept-alive connection's later requests are not cut off
            assert client.get("/ping").json() == {"ok": True}
            time.sleep(0.3)
    started = time.monotonic()
    dribbling.sendall(b"X-Slow: 1\r\n")  # still no blank line
    assert _closed_within(dribbling, 3) and _closed_within(silent, 3)
    assert time.monotonic() - started < 3
    with httpx.Client(base_url=f"http://127.0.0.1:{server}") as client:
        assert client.get("/ping").status_code == 200
