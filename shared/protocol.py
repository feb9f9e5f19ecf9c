"""The gateway ⇄ blockserver wire protocol: one message per WebSocket binary frame.

A frame is `u32 header length (big-endian) | msgpack header | raw tensor bytes`. The header is a
map with a `type` and the message's fields; `tensors` lists each tensor's name, dtype, shape and
byte length, in the order their bytes follow. No pickle, ever. `decode` validates the frame's
structure before any tensor is built; the receiver validates shapes against its session.

Messages of an inference session (DESIGN.md section 4):
    open  {session_id, model, span:[start,end], max_length, batch_size, dtype}  -> ready | error
    step  {step_id, position, hidden[B,T,H], mask?[B,T], hypo_ids?[B]}          -> result {step_id, hidden} | error
    close {}
Stateless:  forward {span, hidden[B,T,H], mask?[B,T]} -> result {hidden}
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import msgpack
import torch

from shared.errors import ProtocolError

MESSAGE_TYPES = {"open", "ready", "step", "result", "close", "forward", "error"}
WIRE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 8
MAX_DIMS = 4
_LENGTH = struct.Struct(">I")


@dataclass
class Message:
    type: str
    fields: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key):
        return self.fields[key]

    def get(self, key, default=None):
        return self.fields.get(key, default)


def encode(type_: str, tensors: dict[str, torch.Tensor] | None = None, **fields) -> bytes:
    descriptors, payloads = [], []
    for name, tensor in (tensors or {}).items():
        tensor = tensor.detach().contiguous().cpu()
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        descriptors.append({"name": name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "codec": "raw", "nbytes": len(raw)})
        payloads.append(raw)
    header = msgpack.packb({"type": type_, **fields, "tensors": descriptors}, use_bin_type=True)
    return b"".join([_LENGTH.pack(len(header)), header, *payloads])


def decode(frame: bytes, max_frame_bytes: int) -> Message:
    """Parse a frame; raise ProtocolError on anything malformed, before allocating tensors."""
    if not isinstance(frame, (bytes, bytearray)):
        raise ProtocolError("frames must be binary")
    if len(frame) > max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_frame_bytes}")
    if len(frame) < _LENGTH.size:
        raise ProtocolError("frame too short for a header")
    (header_len,) = _LENGTH.unpack_from(frame)
    if header_len > MAX_HEADER_BYTES or _LENGTH.size + header_len > len(frame):
        raise ProtocolError(f"bad header length {header_len}")
    try:
        header = msgpack.unpackb(frame[_LENGTH.size:_LENGTH.size + header_len], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict) or header.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {header.get('type') if isinstance(header, dict) else None!r}")
    descriptors = header.pop("tensors", [])
    if not isinstance(descriptors, list) or len(descriptors) > MAX_TENSORS:
        raise ProtocolError(f"tensors must be a list of at most {MAX_TENSORS} descriptors")
    offset = _LENGTH.size + header_len
    tensors = {}
    for d in descriptors:
        name, dtype, shape, nbytes = _check_descriptor(d)
        if offset + nbytes > len(frame):
            raise ProtocolError(f"tensor {name!r} runs past the end of the frame")
        buffer = bytearray(frame[offset:offset + nbytes])
        flat = torch.frombuffer(buffer, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
        offset += nbytes
    if offset != len(frame):
        raise ProtocolError(f"{len(frame) - offset} stray bytes after the tensors")
    return Message(header.pop("type"), header, tensors)


def _check_descriptor(d) -> tuple[str, torch.dtype, list[int], int]:
    if not isinstance(d, dict):
        raise ProtocolError("a tensor descriptor must be a map")
    name, dtype_name, shape, nbytes = d.get("name"), d.get("dtype"), d.get("shape"), d.get("nbytes")
    if not isinstance(name, str) or dtype_name not in WIRE_DTYPES or d.get("codec", "raw") != "raw":
        raise ProtocolError(f"bad tensor descriptor {d!r} (dtypes: {', '.join(WIRE_DTYPES)}; codec: raw)")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ProtocolError(f"bad shape {shape!r} for tensor {name!r}")
    dtype = WIRE_DTYPES[dtype_name]
    numel = 1
    for s in shape:
        numel *= s
    if not isinstance(nbytes, int) or nbytes != numel * dtype.itemsize:
        raise ProtocolError(f"tensor {name!r}: {nbytes!r} bytes do not match shape {shape} of {dtype_name}")
    return name, dtype, shape, nbytes


def error_frame(code: str, message: str, **fields) -> bytes:
    return encode("error", code=code, message=message, **fields)
