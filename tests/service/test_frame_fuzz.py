"""A bounded WebSocket frame fuzzer against a blockserver: 400 frames made by mutating valid ones
(bit flips, truncations, splices, header fields swapped for odd values, random bytes) on fuzzing
sockets, interleaved with another session's steps. Nothing crashes, every frame gets an answer,
the other session's outputs equal a clean run's bit for bit, and when the sockets close the cache
budget is whole again."""

import random

import msgpack
import pytest
import torch

from shared import protocol
from tests.service.test_bad_input import _open, blockserver  # noqa: F401  (the fixture)

ROUNDS = 8
FRAMES_PER_ROUND = 50
ODD = [None, -1, 0, 2**63, -(2**63), 1e308, float("nan"), "", "x" * 5000, [], {}, [[]], True, b"\xff" * 64]


def _header_and_body(frame: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(frame[:4], "big")
    return msgpack.unpackb(frame[4:4 + size]), frame[4 + size:]


def _pack(header: dict, body: bytes) -> bytes:
    packed = msgpack.packb(header)
    return len(packed).to_bytes(4, "big") + packed + body


def mutate(frame: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    data = bytearray(frame)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 1:  # truncate
        return bytes(data[:rng.randrange(len(data))])
    if kind == 2:  # splice random bytes in
        i = rng.randrange(len(data))
        return bytes(data[:i]) + rng.randbytes(rng.randint(1, 64)) + bytes(data[i:])
    if kind == 3:  # pure noise
        return rng.randbytes(rng.randint(0, 256))
    header, body = _header_and_body(frame)
    if kind == 4:  # one header field becomes something odd
        key = rng.choice(list(header))
        header[key] = rng.choice(ODD)
        return _pack(header, body)
    # a tensor descriptor lies about itself
    if header.get("tensors"):
        descriptor = rng.choice(header["tensors"])
        field = rng.choice(["shape", "nbytes", "dtype", "codec", "name"])
        descriptor[field] = rng.choice([[2**31, 2**31], -5, "complex128", "zip", "prompts", [1, 0, 3], 2**40])
    return _pack(header, body)


def test_fuzzed_frames_spare_the_server_and_other_sessions(blockserver):  # noqa: F811
    rng = random.Random(1234)
    torch.manual_seed(0)
    fingerprint, service = blockserver.fingerprint, blockserver.app.state.service
    size = service.runtime.layers.hidden_size
    budget = service.runtime.cache_tokens_left
    inputs = [torch.randn(1, 3 if i == 0 else 1, size) for i in range(ROUNDS)]

    def run_clean() -> list[torch.Tensor]:
        with blockserver.websocket_connect("/ws") as ws:
            assert isinstance(_open(ws, "clean", fingerprint).header, protocol.Ready)
            return [_step(ws, x, position) for x, position in zip(inputs, _positions())]

    def _positions():
        position = 0
        for x in inputs:
            yield position
            position += x.shape[1]

    def _step(ws, hidden, position):
        ws.send_bytes(protocol.encode(protocol.Step(step_id=position, position=position), {"hidden": hidden}))
        reply = protocol.decode(ws.receive_bytes(), 1 << 26)
        assert isinstance(reply.header, protocol.Result), reply.header
        return reply.tensors["hidden"]

    clean = run_clean()
    valid = [
        protocol.encode(protocol.Open(session_id="fuzz", model=fingerprint, span=[2, 4], max_length=64,
                                      dtype="float32")),
        protocol.encode(protocol.Step(step_id=0, position=0), {"hidden": torch.randn(1, 2, size)}),
        protocol.encode(protocol.Forward(model=fingerprint, span=[2, 4]), {"hidden": torch.randn(2, 3, size)}),
        protocol.encode(protocol.Step(step_id=1, position=0), {"hidden": torch.randn(1, 1, size),
                                                               "mask": torch.ones(1, 1, dtype=torch.long)}),
    ]
    answered = 0
    with blockserver.websocket_connect("/ws") as other:
        assert isinstance(_open(other, "other", fingerprint).header, protocol.Ready)
        outputs = []
        for x, position in zip(inputs, _positions()):
            with blockserver.websocket_connect("/ws") as fuzz:
                for _ in range(FRAMES_PER_ROUND):
                    fuzz.send_bytes(mutate(rng.choice(valid), rng))
                    reply = protocol.decode(fuzz.receive_bytes(), 1 << 26)  # every frame is answered
                    assert isinstance(reply.header, protocol.Result | protocol.Ready | protocol.Error)
                    answered += 1
            outputs.append(_step(other, x, position))
    assert answered == ROUNDS * FRAMES_PER_ROUND
    for got, want in zip(outputs, clean):
        assert torch.equal(got, want)
    assert service.runtime.cache_tokens_left == budget and not service.runtime.open_sessions()


@pytest.mark.parametrize("seed", [7])
def test_mutations_are_not_all_rejected_early(seed):
    """The fuzzer reaches past the frame parser: some mutated frames still decode."""
    rng = random.Random(seed)
    frame = protocol.encode(protocol.Step(step_id=0, position=0), {"hidden": torch.randn(1, 2, 8)})
    decoded = 0
    for _ in range(200):
        try:
            protocol.decode(mutate(frame, rng), 1 << 26)
            decoded += 1
        except Exception:
            pass
    assert decoded >= 3  # bit flips in tensor bytes, for one: the server then computes on them
