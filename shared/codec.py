"""`dyn8`: 8-bit blockwise compression of hidden states on the wire (opt-in, `--wire-codec dyn8`).

Each block of BLOCK consecutive values (of the flattened tensor) is divided by its largest
magnitude and rounded to the nearest of 256 codes of a signed dynamic map: zero, one, and for
each of seven decades 10^-6 .. 10^0 a sign and a linear fraction with 2^j steps in decade j (the
code of Dettmers' 8-bit optimizers that PETALS uses for activations). Small values keep their
relative precision, which plain int8 loses next to the huge outliers of LLM activations.
Blocks of 128 (PETALS uses 4096): a chain through the gateway crosses the wire twice per hop,
and small blocks keep the summed error down (SmolLM2, 3 hops, 6 crossings: max |Δlogit| 0.98
against 1.67 with blocks of 256; ../shared/reviews/batching-notes.md, section D).

Payload: f32 absmax[ceil(n / BLOCK)] | u8 index[n], about 1.03 bytes per value against 2 for
bfloat16. The error of a value is at most 0.0071 x its block's absmax. Never used for the KV
cache (it stays on the server) nor for gradients."""

from __future__ import annotations

import torch

BLOCK = 128
WIRE_CODECS = ("raw", "dyn8")


def _dynamic_map() -> torch.Tensor:
    values = [0.0, 1.0]
    decades = 7
    for j in range(decades):
        edges = torch.linspace(0.1, 1.0, 2**j + 1, dtype=torch.float64)
        scale = 10.0 ** (j - (decades - 1))
        for mid in ((edges[:-1] + edges[1:]) / 2).tolist():
            values += [scale * mid, -scale * mid]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


CODE = _dynamic_map()
_MIDPOINTS = (CODE[1:] + CODE[:-1]) / 2  # a value rounds to code i when it lies between midpoints i-1 and i


def payload_bytes(numel: int) -> int:
    return 4 * -(-numel // BLOCK) + numel


def compress(tensor: torch.Tensor) -> bytes | None:
    """The dyn8 payload of a floating tensor, or None when it holds non-finite values (those go
    raw, so that the receiver sees and rejects them as it would uncompressed)."""
    flat = tensor.detach().reshape(-1).float().cpu()
    if not bool(torch.isfinite(flat).all()):
        return None
    n = flat.numel()
    blocks = -(-n // BLOCK)
    padded = torch.nn.functional.pad(flat, (0, blocks * BLOCK - n)).view(blocks, BLOCK)
    absmax = padded.abs().amax(dim=1)
    scaled = padded / torch.where(absmax > 0, absmax, 1.0)[:, None]
    index = torch.bucketize(scaled, _MIDPOINTS).to(torch.uint8).reshape(-1)[:n]
    return absmax.numpy().tobytes() + index.numpy().tobytes()


def decompress(payload: bytes | bytearray | memoryview, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor a dyn8 payload encodes; the caller has checked len(payload) == payload_bytes(n).
    Raises ValueError on a non-finite or negative block scale."""
    n = 1
    for s in shape:
        n *= s
    blocks = -(-n // BLOCK)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    absmax = torch.frombuffer(bytearray(payload[:4 * blocks]), dtype=torch.float32)
    if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
        raise ValueError("dyn8 block scales must be finite and non-negative")
    index = torch.frombuffer(bytearray(payload[4 * blocks:]), dtype=torch.uint8).long()
    values = CODE[index] * absmax.repeat_interleave(BLOCK)[:n]
    return values.reshape(shape).to(dtype)
