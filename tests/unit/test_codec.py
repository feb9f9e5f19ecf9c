"""dyn8, the opt-in 8-bit wire codec for hidden states: its error bound on any values, its frames,
and what it costs SmolLM2's logits across three hops."""

import pytest
import torch

from shared import protocol
from shared.codec import BLOCK, CODE, compress, decompress, payload_bytes
from shared.errors import ProtocolError

BOUND = 0.0071  # of the block's absmax: half the widest gap between neighbouring codes


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    return decompress(compress(t), list(t.shape), t.dtype)


def block_absmax(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1).float()
    pad = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK))
    return pad.view(-1, BLOCK).abs().amax(1).repeat_interleave(BLOCK)[:flat.numel()]


def test_the_code_table():
    assert CODE.numel() == 256 and CODE.unique().numel() == 256
    assert CODE.min() > -1 and CODE.max() == 1 and 0 in CODE
    assert ((CODE[1:] - CODE[:-1]).max() / 2) <= BOUND


@pytest.mark.parametrize("kind", ["normal", "heavy", "outliers", "zeros", "tiny", "odd-length"])
def test_error_is_bounded_by_the_block_absmax(kind):
    g = torch.Generator().manual_seed(0)
    t = {"normal": lambda: torch.randn(3, 7, 576, generator=g),
         "heavy": lambda: torch.distributions.StudentT(1.5).sample((4, 1000)),
         "outliers": lambda: torch.randn(2, 576, generator=g).index_fill_(1, torch.tensor([5, 300]), 2e4),
         "zeros": lambda: torch.zeros(2, 300),
         "tiny": lambda: torch.randn(1, 1, 64, generator=g) * 1e-30,
         "odd-length": lambda: torch.randn(1, 3, 97, generator=g)}[kind]()
    back = roundtrip(t)
    assert back.shape == t.shape and back.dtype == t.dtype
    assert ((back - t).abs().reshape(-1) <= BOUND * block_absmax(t) + 1e-37).all()
    assert len(compress(t)) == payload_bytes(t.numel()) <= t.numel() * 1.04 + 4  # bf16 takes 2 per value


def test_frames_carry_dyn8_only_for_hidden_states_and_only_when_finite():
    hidden, mask = torch.randn(2, 5, 64).bfloat16(), torch.ones(2, 5, dtype=torch.long)
    frame = protocol.encode(protocol.Step(step_id=0, position=0), {"hidden": hidden, "mask": mask}, "dyn8")
    raw = protocol.encode(protocol.Step(step_id=0, position=0), {"hidden": hidden, "mask": mask})
    assert len(frame) < len(raw) - hidden.numel() * 0.9
    message = protocol.decode(frame, 1 << 20)
    assert message.tensors["hidden"].dtype == torch.bfloat16 and torch.equal(message.tensors["mask"], mask)
    assert (message.tensors["hidden"].float() - hidden.float()).abs().max() <= BOUND * hidden.float().abs().max() + 0.02
    grads = protocol.encode(protocol.Result(), {"grad": hidden}, "dyn8")  # gradients are never compressed
    assert torch.equal(protocol.decode(grads, 1 << 20).tensors["grad"], hidden)
    nan = hidden.clone()
    nan[0, 0, 0] = float("nan")  # goes raw, so the receiver sees the NaN and treats it as a fault
    assert torch.isnan(protocol.decode(protocol.encode(protocol.Result(), {"hidden": nan}, "dyn8"),
                                       1 << 20).tensors["hidden"]).any()


def test_malformed_dyn8_descriptors_are_refused():
    import msgpack

    def frame(descriptor: dict, payload: bytes) -> bytes:
        header = msgpack.packb({"type": "result", "tensors": [descriptor]})
        return len(header).to_bytes(4, "big") + header + payload

    good = compress(torch.randn(300))
    base = {"name": "hidden", "dtype": "float32", "shape": [300], "codec": "dyn8", "nbytes": len(good)}
    assert protocol.decode(frame(base, good), 1 << 20).tensors["hidden"].shape == (300,)
    with pytest.raises(ProtocolError, match="bytes do not match"):
        protocol.decode(frame(base | {"nbytes": 600}, good + b"\0" * (600 - len(good))), 1 << 20)
    with pytest.raises(ProtocolError, match="floating tensors only"):
        protocol.decode(frame(base | {"dtype": "int64"}, good), 1 << 20)
    with pytest.raises(ProtocolError, match="codecs"):
        protocol.decode(frame(base | {"codec": "zstd"}, good), 1 << 20)
    bad_scale = torch.tensor([float("inf"), 1.0]).numpy().tobytes() + good[8:]
    with pytest.raises(ProtocolError, match="finite"):
        protocol.decode(frame(base, bad_scale), 1 << 20)
