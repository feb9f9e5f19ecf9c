"""Errors that depend on the swarm's state: no chain (503 + Retry-After), a failure after the
stream started (error event, then [DONE]), and the API key."""

import json
import signal

import httpx
import pytest

from tests.e2e.swarm import Swarm


@pytest.fixture
def lonely(tiny_dir, tmp_path):
    """A gateway with an API key and only the first two spans of three."""
    s = Swarm(str(tiny_dir("llama")), [], tmp_path, gateway_args=["--api-key", "sekret"], model_name="llama")
    try:
        s.gateway = s._spawn("gateway", ["gateway", "--model", s.model, "--model-name", "llama", "--port", str(s.port),
                                         "--api-key", "sekret", "--step-timeout", "5", "--failover-timeout", "2"])
        s.add_blockserver("0:2")
        s.add_blockserver("2:4")
        yield s
    finally:
        s.stop()


def wait_servers(s, count):
    import time

    for _ in range(200):
        try:
            if len(s.servers()) == count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError


AUTH = {"Authorization": "Bearer sekret"}


def test_api_key_and_no_chain(lonely):
    wait_servers(lonely, 2)
    body = {"model": "llama", "prompt": "abc", "max_tokens": 4}
    missing = httpx.post(f"{lonely.url}/v1/completions", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(f"{lonely.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    # the swarm's views show internal addresses: the key guards them too (Basic for browsers)
    for view in ("/v1/swarm", "/swarm"):
        refused = httpx.get(f"{lonely.url}{view}")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(f"{lonely.url}{view}", headers=AUTH).status_code == 200
        assert httpx.get(f"{lonely.url}{view}", auth=("anyone", "sekret")).status_code == 200
        assert httpx.get(f"{lonely.url}{view}", auth=("anyone", "nope")).status_code == 401
    health = httpx.get(f"{lonely.url}/health")
    assert health.status_code == 503 and health.json()["missing_layers"] == [4, 5]
    for stream in (False, True):
        r = httpx.post(f"{lonely.url}/v1/completions", json=body | {"stream": stream}, headers=AUTH)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit()
        assert "no online server covers layers 4..5" in r.json()["error"]["message"]


def test_failure_after_the_stream_started_ends_with_an_error_event(lonely):
    lonely.add_blockserver("4:6")
    lonely.wait_healthy()
    body = {"model": "llama", "prompt": [1, 40, 41], "max_tokens": 200, "temperature": 0, "stream": True,
            "logit_bias": {"2": -100}}
    events = []
    with httpx.stream("POST", f"{lonely.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 3:
                lonely.blockservers[-1].send_signal(signal.SIGKILL)  # the only server of layers 4:6
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and events[-2]["error"]["message"]
    assert all("choices" in e for e in events[:-2])
    assert len(events) < 200  # it stopped early, with an error, not silently


def test_hostile_clients_of_a_real_swarm(lonely):
    """A 10 MB body is refused at once while /health stays quick; a blockserver's socket serves
    nobody without a grant from its gateway."""
    import time

    from websockets.sync.client import connect

    from shared import protocol

    wait_servers(lonely, 2)
    big = b'{"model": "llama", "prompt": "' + b"x" * (10 * 2**20) + b'"}'
    started = time.monotonic()
    r = httpx.post(f"{lonely.url}/v1/completions", content=big, timeout=30,
                   headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 2
    started = time.monotonic()
    httpx.get(f"{lonely.url}/health", timeout=5)
    assert time.monotonic() - started < 1

    server = httpx.get(f"{lonely.url}/v1/swarm", headers=AUTH).json()["servers"][0]
    fingerprint = httpx.get(f"{lonely.url}/health").json()["fingerprint"]
    url = server["url"].replace("http://", "ws://") + "/ws"
    with connect(url, compression=None) as ws:
        ws.send(protocol.encode(protocol.Open(session_id="squat", model=fingerprint,
                                              span=[server["start"], server["end"]], max_length=64,
                                              dtype=server["dtype"])))
        reply = protocol.decode(ws.recv(), 1 << 20).header
        assert isinstance(reply, protocol.Error) and reply.code == "unauthorized", reply
    assert httpx.get(f"{server['url']}/health").json()["sessions"] == 0
