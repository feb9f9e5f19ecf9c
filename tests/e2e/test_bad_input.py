"""Malformed requests get OpenAI-shaped errors with the right status, and nothing else is harmed:
the gateway keeps serving, a blockserver answers bad frames with error frames and its other
sessions go on."""

import asyncio
import struct

import httpx
import msgpack
import pytest
import torch
from websockets.asyncio.client import connect

from shared import protocol
from shared.models.loader import load_span

GOOD = {"prompt": [1, 40, 41], "max_tokens": 4, "temperature": 0}


def bad_completions(model):
    long_prompt = [5] * 300  # the tiny models' context is 256 tokens
    return [
        ({"model": model, "prompt": 42}, 400, "prompt"),
        ({"model": model, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": model, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": model, "prompt": "x", "n": 0}, 400, "n"),
        ({"model": model, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": model, "prompt": "x", "top_p": -0.5}, 400, "top_p"),
        ({"model": model, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": model, "prompt": "x", "logit_bias": {"999999": 5}}, 400, "logit_bias"),
        ({"model": model, "prompt": "x", "logit_bias": {"cat": 5}}, 400, "logit_bias"),
        ({"model": model, "prompt": "x", "presence_penalty": 9}, 400, "presence_penalty"),
        ({"model": model, "prompt": []}, 400, "prompt"),
        ({"model": model, "prompt": [1, 2, 99999]}, 400, "prompt"),
        ({"model": model, "prompt": long_prompt, "max_tokens": 4}, 400, "prompt"),
        ({"model": model, "prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
        ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ({"prompt": "x"}, 400, "model"),
        ({"model": model, "prompt": "x", "n": 100, "max_tokens": 1}, 400, "n"),
    ]


def bad_chats(model):
    return [
        ({"model": model, "messages": []}, 400, "messages"),
        ({"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages"),
        ({"model": model, "messages": "hello"}, 400, "messages"),
        ({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5}, 400,
         "max_completion_tokens"),
        ({"model": model, "messages": [{"role": "user", "content": "hi"}],
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
    ]


def check_error(response, status, param):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_malformed_requests_get_the_right_errors_and_the_gateway_keeps_serving(swarm):
    with httpx.Client(base_url=swarm.url, timeout=30) as client:
        for body, status, param in bad_completions(swarm.model_name):
            check_error(client.post("/v1/completions", json=body), status, param)
        for body, status, param in bad_chats(swarm.model_name):
            check_error(client.post("/v1/chat/completions", json=body), status, param)
        invalid_json = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        check_error(invalid_json, 400, None)
        check_error(client.get("/v1/models/no/such/model"), 404, "model")
        ok = client.post("/v1/completions", json={"model": swarm.model_name, **GOOD})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert client.get("/health").status_code == 200


def _frame(header: dict) -> bytes:
    packed = msgpack.packb(header)
    return struct.pack(">I", len(packed)) + packed


def _frames(hidden_size):
    """Malformed frames, each with the error code it must get."""
    ok_hidden = torch.zeros(1, 1, hidden_size)
    return [
        (b"\x00\x00", "protocol_error"),  # too short
        (b"\x00\x00\x00\x05garbage", "protocol_error"),  # header is not msgpack
        (protocol.encode("dance"), "protocol_error"),  # unknown type
        (protocol.encode("step", {"hidden": ok_hidden.double().float().half()}, step_id=1, position=0), "bad_request"),
        (protocol.encode("step", {"hidden": torch.zeros(1, 1, hidden_size + 1)}, step_id=1, position=0), "bad_request"),
        (protocol.encode("step", {"hidden": ok_hidden}, step_id=1, position=999), "bad_request"),
        (protocol.encode("step", {"hidden": torch.zeros(1, 500, hidden_size)}, step_id=1, position=0), "bad_request"),
        # a descriptor claiming a 16 GiB tensor that the frame does not carry
        (_frame({"type": "step", "step_id": 1, "position": 0, "tensors": [
            {"name": "hidden", "dtype": "float32", "shape": [65536, 65536, 1], "codec": "raw", "nbytes": 2**34}]}),
         "protocol_error"),
        # a descriptor whose byte count does not match its shape
        (_frame({"type": "step", "step_id": 1, "position": 0, "tensors": [
            {"name": "hidden", "dtype": "float32", "shape": [1, 1, hidden_size], "codec": "raw", "nbytes": 3}]})
         + b"abc", "protocol_error"),
        (protocol.encode("step", {"hidden": ok_hidden, "mask": torch.ones(2, 2, dtype=torch.long)}, step_id=1,
                         position=0), "bad_request"),
    ]


def test_malformed_frames_get_error_frames_and_spare_other_sessions(swarm):
    server = next(s for s in swarm.servers() if s["start"] == 2)
    ws_url = server["url"].replace("http://", "ws://") + "/ws"
    span = load_span(swarm.directory, 2, 4, dtype="float32")  # to check the healthy session's results
    hidden_size = span.hidden_size

    async def scenario():
        async with connect(ws_url, compression=None) as good, connect(ws_url, compression=None) as bad:
            opening = dict(model=swarm.model_name, span=[2, 4], batch_size=1, max_length=64, dtype="float32")
            for ws, sid in ((good, "good"), (bad, "bad")):
                await ws.send(protocol.encode("open", session_id=sid, **opening))
                assert protocol.decode(await ws.recv(), 1 << 26).type == "ready"
            torch.manual_seed(0)
            first = torch.randn(1, 3, hidden_size)
            await good.send(protocol.encode("step", {"hidden": first}, step_id=0, position=0))
            out1 = protocol.decode(await good.recv(), 1 << 26)

            for frame, code in _frames(hidden_size):
                await bad.send(frame)
                reply = protocol.decode(await bad.recv(), 1 << 26)
                assert reply.type == "error" and reply["code"] == code, (frame[:40], reply.fields)
            await bad.send("text frames are refused")
            assert protocol.decode(await bad.recv(), 1 << 26)["code"] == "protocol_error"

            second = torch.randn(1, 1, hidden_size)
            await good.send(protocol.encode("step", {"hidden": second}, step_id=1, position=3))
            out2 = protocol.decode(await good.recv(), 1 << 26)
            return first, second, out1.tensors["hidden"], out2.tensors["hidden"]

    first, second, out1, out2 = asyncio.run(scenario())
    cache = span.new_cache(1, 64)
    torch.testing.assert_close(out1, span.step(first, cache), atol=1e-5, rtol=0)
    torch.testing.assert_close(out2, span.step(second, cache), atol=1e-5, rtol=0)


def test_sessions_free_their_cache_when_sockets_drop(swarm):
    server = next(s for s in swarm.servers() if s["start"] == 0)
    health = server["url"] + "/health"
    before = httpx.get(health).json()["cache_tokens_left"]

    async def open_and_drop():
        ws = await connect(server["url"].replace("http://", "ws://") + "/ws", compression=None)
        await ws.send(protocol.encode("open", session_id="dropme", model=swarm.model_name, span=[0, 2],
                                      batch_size=2, max_length=100, dtype="float32"))
        assert protocol.decode(await ws.recv(), 1 << 26).type == "ready"
        assert httpx.get(health).json()["cache_tokens_left"] == before - 200
        ws.transport.abort()  # no close frame: the connection just vanishes

    asyncio.run(open_and_drop())
    for _ in range(50):
        if httpx.get(health).json()["cache_tokens_left"] == before:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert httpx.get(health).json()["cache_tokens_left"] == before


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_fields_are_ignored(swarm, path):
    body = {"model": swarm.model_name, "max_tokens": 2, "temperature": 0, "metadata": {"a": 1}, "store": False}
    body |= {"prompt": "ab"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "ab"}]}
    assert httpx.post(f"{swarm.url}{path}", json=body, timeout=30).status_code == 200
