"""Malformed requests get OpenAI-shaped errors with the right status, and nothing else is harmed:
the gateway keeps serving, a blockserver answers bad frames with error frames and its other
sessions go on. In-process: the gateway through httpx's ASGI transport, the blockserver's socket
through Starlette's test client."""

import asyncio
import struct
import time

import msgpack
import pytest
import torch
from starlette.testclient import TestClient

from blockserver.app import create_app as create_blockserver
from blockserver.settings import BlockserverSettings
from shared import protocol
from shared.models.loader import load_facts, load_span
from tests.service.inprocess import in_process_swarm

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
        # caps that keep one request's cost bounded
        ({"model": model, "prompt": "x", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),  # isdigit() but no int
        ({"model": model, "prompt": "x", "logit_bias": {"---5": 1}}, 400, "logit_bias"),
        ({"model": model, "prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
        ({"model": model, "prompt": "x", "stop": ["y" * 257]}, 400, "stop"),
        ({"model": model, "prompt": ["x"] * 40, "n": 2}, 400, "n"),  # 80 rows, before tokenizing 40 prompts
        ({"model": model, "prompt": "x" * 200_000}, 400, "prompt"),  # cannot fit: refused untokenized
    ]


def bad_chats(model):
    hi = [{"role": "user", "content": "hi"}]
    return [
        ({"model": model, "messages": []}, 400, "messages"),
        ({"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages"),
        ({"model": model, "messages": "hello"}, 400, "messages"),
        ({"model": model, "messages": [{"role": "user"}]}, 400, "messages"),  # no content
        ({"model": model, "messages": [{"role": "system", "content": None}]}, 400, "messages"),
        ({"model": model, "messages": hi, "max_completion_tokens": -5}, 400, "max_completion_tokens"),
        ({"model": model, "messages": hi, "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
         400, "tools"),
        ({"model": model, "messages": hi, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"model": model, "messages": hi, "tool_choice": "required"}, 400, "tool_choice"),
        ({"model": model, "messages": hi, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"model": model, "messages": hi, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ]


def check_error(response, status, param):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_malformed_requests_get_the_right_errors_and_the_gateway_keeps_serving(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:6"}) as swarm:
            client = swarm.client
            for body, status, param in bad_completions("tiny"):
                check_error(await client.post("/v1/completions", json=body), status, param)
            for body, status, param in bad_chats("tiny"):
                check_error(await client.post("/v1/chat/completions", json=body), status, param)
            invalid = await client.post("/v1/completions", content=b"{not json",
                                        headers={"content-type": "application/json"})
            check_error(invalid, 400, None)
            check_error(await client.get("/v1/models/no/such/model"), 404, "model")
            # an assistant message that calls tools may come without content
            tool_call = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "user", "content": "go on"}]
            r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": tool_call, **GOOD})
            assert r.status_code == 200, r.text
            ok = await client.post("/v1/completions", json={"model": "tiny", **GOOD})
            assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
            # limits of sampling that used to raise: top_p 0 keeps the likeliest token, a tiny temperature is greedy
            greedy = ok.json()["choices"][0]["text"]
            for extreme in ({"temperature": 1.0, "top_p": 0.0}, {"temperature": 1e-45}):
                r = await client.post("/v1/completions", json={"model": "tiny", **GOOD} | extreme)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (extreme, r.text)
            assert (await client.get("/health")).status_code == 200

    asyncio.run(scenario())


def test_a_body_over_the_limit_is_refused_before_it_is_read(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:6"}, gateway={"max_body_mib": 1}) as swarm:
            client = swarm.client
            big = b'{"model": "tiny", "prompt": "' + b"x" * (2 * 2**20) + b'"}'
            started = time.monotonic()
            check_error(await client.post("/v1/completions", content=big,
                                          headers={"content-type": "application/json"}), 413, None)

            async def undeclared():  # chunked: no Content-Length to refuse it by
                yield big[: 2**19]
                yield big[2**19:]
            r = await client.post("/v1/completions", content=undeclared(), headers={"content-type": "application/json"})
            check_error(r, 413, None)
            assert r.json()["error"]["code"] == "request_too_large"
            assert time.monotonic() - started < 5
            ok = await client.post("/v1/completions", json={"model": "tiny", **GOOD})
            assert ok.status_code == 200, ok.text

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def blockserver(tiny_dir):
    """A blockserver app serving layers 2:4 of the tiny llama, through Starlette's test client."""
    directory = tiny_dir("llama")
    settings = BlockserverSettings(model=str(directory), blocks="2:4", throughput=1000.0, dtype="float32",
                                   num_threads=1, idle_timeout_s=30)
    with TestClient(create_blockserver(settings, "http://127.0.0.1:1")) as client:
        client.fingerprint = load_facts(directory).fingerprint
        client.directory = directory
        yield client


def _frame(header: dict) -> bytes:
    packed = msgpack.packb(header)
    return struct.pack(">I", len(packed)) + packed


def _frames(hidden_size, fingerprint):
    """Malformed frames, each with the error code it must get."""
    ok_hidden = torch.zeros(1, 1, hidden_size)

    def step(hidden, position=0, **tensors):
        return protocol.encode(protocol.Step(step_id=1, position=position), {"hidden": hidden, **tensors})

    def opening(**fields):
        return protocol.encode(protocol.Open(**({"session_id": "again", "model": fingerprint, "span": [2, 4],
                                                  "max_length": 64, "dtype": "float32"} | fields)))

    return [
        (b"\x00\x00", "protocol_error"),  # too short
        (b"\x00\x00\x00\x05garbage", "protocol_error"),  # header is not msgpack
        (_frame({"type": "dance"}), "protocol_error"),  # unknown type
        (step(ok_hidden.half()), "bad_request"),  # wrong dtype
        (step(torch.zeros(1, 1, hidden_size + 1)), "bad_request"),  # wrong hidden size
        (step(ok_hidden, position=999), "bad_request"),  # beyond what the session holds
        (step(torch.zeros(1, 500, hidden_size)), "bad_request"),  # more tokens than the session's room
        (opening(), "bad_request"),  # this socket already has a session
        # a descriptor claiming a 16 GiB tensor that the frame does not carry
        (_frame({"type": "step", "step_id": 1, "position": 0, "tensors": [
            {"name": "hidden", "dtype": "float32", "shape": [65536, 65536, 1], "codec": "raw", "nbytes": 2**34}]}),
         "protocol_error"),
        # a descriptor whose byte count does not match its shape
        (_frame({"type": "step", "step_id": 1, "position": 0, "tensors": [
            {"name": "hidden", "dtype": "float32", "shape": [1, 1, hidden_size], "codec": "raw", "nbytes": 3}]})
         + b"abc", "protocol_error"),
        (step(ok_hidden, mask=torch.ones(2, 2, dtype=torch.long)), "bad_request"),
        (_frame({"type": "step", "step_id": 1, "position": 0, "tensors": []}), "protocol_error"),  # no hidden
    ]


def _open(ws, session_id, fingerprint, batch_size=1, max_length=64, span=(2, 4)):
    ws.send_bytes(protocol.encode(protocol.Open(session_id=session_id, model=fingerprint, span=list(span),
                                                batch_size=batch_size, max_length=max_length, dtype="float32")))
    return protocol.decode(ws.receive_bytes(), 1 << 26)


def test_malformed_frames_get_error_frames_and_spare_other_sessions(blockserver):
    span = load_span(blockserver.directory, 2, 4, dtype="float32")  # to check the healthy session's results
    hidden_size = span.hidden_size
    with blockserver.websocket_connect("/ws") as good, blockserver.websocket_connect("/ws") as bad:
        for ws, sid in ((good, "good"), (bad, "bad")):
            assert _open(ws, sid, blockserver.fingerprint).type == "ready"
        torch.manual_seed(0)
        first = torch.randn(1, 3, hidden_size)
        good.send_bytes(protocol.encode(protocol.Step(step_id=0, position=0), {"hidden": first}))
        out1 = protocol.decode(good.receive_bytes(), 1 << 26).tensors["hidden"]
        for frame, code in _frames(hidden_size, blockserver.fingerprint):
            bad.send_bytes(frame)
            reply = protocol.decode(bad.receive_bytes(), 1 << 26)
            assert reply.type == "error" and reply.header.code == code, (frame[:40], reply.header)
        bad.send_text("text frames are refused")
        assert protocol.decode(bad.receive_bytes(), 1 << 26).header.code == "protocol_error"
        second = torch.randn(1, 1, hidden_size)
        good.send_bytes(protocol.encode(protocol.Step(step_id=1, position=3), {"hidden": second}))
        out2 = protocol.decode(good.receive_bytes(), 1 << 26).tensors["hidden"]
    cache = span.new_cache(1, 64)
    torch.testing.assert_close(out1, span.step(first, cache), atol=1e-5, rtol=0)
    torch.testing.assert_close(out2, span.step(second, cache), atol=1e-5, rtol=0)


def test_opens_are_checked_against_this_server(blockserver):
    fingerprint = blockserver.fingerprint
    with blockserver.websocket_connect("/ws") as ws:
        reply = _open(ws, "s", "0" * 20)
        assert reply.header.code == "model_mismatch" and fingerprint in reply.header.message
        assert _open(ws, "s", fingerprint, span=(0, 4)).header.code == "bad_request"  # not our layers
        assert _open(ws, "s", fingerprint, max_length=10**6).header.code == "bad_request"  # beyond the context
        assert _open(ws, "s", fingerprint, span=(3, 4)).type == "ready"  # a sub-range of our layers is fine


def wait_all_free(blockserver) -> int:
    """The whole budget, once earlier tests' sessions are gone (sockets close asynchronously)."""
    for _ in range(100):
        health = blockserver.get("/health").json()
        if health["cache_tokens_left"] == health["cache_tokens"]:
            break
        time.sleep(0.02)
    assert health["cache_tokens_left"] == health["cache_tokens"]
    return health["cache_tokens"]


def test_sessions_free_their_cache_when_sockets_drop(blockserver):
    budget = wait_all_free(blockserver)
    with blockserver.websocket_connect("/ws") as ws:
        assert _open(ws, "dropme", blockserver.fingerprint, batch_size=2, max_length=100).type == "ready"
        assert blockserver.get("/health").json()["cache_tokens_left"] == budget - 200
    assert wait_all_free(blockserver) == budget
