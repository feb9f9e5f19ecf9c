"""The gateway ⇄ blockserver wire protocol: one message per WebSocket binary frame.

A frame is `u32 header length (big-endian) | msgpack header | tensor bytes`. The header is a
map with a `type`, the message's fields, and `tensors`: each tensor's name, dtype, shape, codec
and byte length, in the order their bytes follow. No pickle, ever. A tensor's codec is `raw`
(its bytes) or, for hidden states of a session or forward opened with `wire: dyn8`, `dyn8`
(8-bit blockwise, shared/codec.py).

Every message type is a frozen pydantic model below; `decode` validates the header against it
(unknown types, unknown fields, wrong types and unexpected tensors are refused) and checks every
tensor descriptor before any tensor is built. The receiver then checks shapes against its session.

Messages of an inference session (DESIGN.md section 4), one WebSocket per session per server:
    Open   {session_id, model, span, max_length, batch_size, dtype, reserve_length?, wire?} -> Ready | Error
    Step   {step_id, position}  hidden[B,T,H] mask?[B,T] hypo_ids?[B] prompts?[L,P,H]
                                                          -> Result{step_id, position} hidden | Error
    Close  {}
Stateless, on any socket (scoring and fine-tuning; nothing is kept between calls):
    Forward  {model, span, wire?}  hidden[B,T,H] mask?[B,T] prompts?[L,P,H]   -> Result hidden
    Backward {model, span}  hidden[B,T,H] grad[B,T,H] mask?[B,T] prompts?[L,P,H]
                                                          -> Result grad[B,T,H] grad_prompts?[L,P,H]
`prompts` are deep prompts, one [P, H] per layer of the span, added before that layer to the hidden
states of positions 0..P-1; `grad` on Backward is the loss's gradient with respect to the output,
on its Result the gradient with respect to the input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import msgpack
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from shared.codec import WIRE_CODECS, compress, decompress, payload_bytes
from shared.errors import ProtocolError

WIRE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
}
WIRE_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
COMPRESSIBLE = frozenset({torch.float32, torch.bfloat16, torch.float16})
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 8
MAX_DIMS = 4
MAX_BATCH = 256  # rows of one session
_LENGTH = struct.Struct(">I")

SessionId = Annotated[StrictStr, Field(min_length=1, max_length=128)]
NonNegative = Annotated[StrictInt, Field(ge=0)]
LayerRange = Annotated[list[NonNegative], Field(min_length=2, max_length=2)]  # [start, end)
ComputeDtype = Literal["float32", "bfloat16", "float16"]


class Header(BaseModel):
    """A message's header. `tensors` lists the tensors it must and may carry."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    required_tensors: ClassVar[frozenset[str]] = frozenset()
    optional_tensors: ClassVar[frozenset[str]] = frozenset()


# A gateway's signed grant (shared/identity.py): {payload, public_key, signature}
Grant = Annotated[dict[Annotated[StrictStr, Field(max_length=32)], Annotated[StrictStr, Field(max_length=8192)]],
                  Field(max_length=4)]


class Open(Header):
    type: Literal["open"] = "open"
    grant: Grant | None = None  # required by blockservers that serve gateways
    session_id: SessionId
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]  # the model's fingerprint
    span: LayerRange  # the layers this session runs, within the server's span
    max_length: Annotated[StrictInt, Field(ge=1)]  # tokens the session may reach
    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)] = 1
    dtype: ComputeDtype
    reserve_length: Annotated[StrictInt, Field(ge=1)] | None = None  # room to reserve now (default max_length);
    # the server takes more, in pages, as the session grows
    wire: Literal["raw", "dyn8"] = "raw"  # how the session's results carry hidden states (shared/codec.py)


class Ready(Header):
    type: Literal["ready"] = "ready"
    session_id: SessionId
    position: NonNegative = 0


class Step(Header):
    type: Literal["step"] = "step"
    step_id: NonNegative
    position: NonNegative  # tokens the server must already hold; it truncates to this first
    required_tensors = frozenset({"hidden"})
    optional_tensors = frozenset({"mask", "hypo_ids", "prompts"})


class Result(Header):
    type: Literal["result"] = "result"
    step_id: NonNegative | None = None
    position: NonNegative | None = None  # tokens held after the step
    optional_tensors = frozenset({"hidden", "grad", "grad_prompts"})


class Close(Header):
    type: Literal["close"] = "close"


class Forward(Header):
    type: Literal["forward"] = "forward"
    grant: Grant | None = None
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    span: LayerRange
    wire: Literal["raw", "dyn8"] = "raw"
    required_tensors = frozenset({"hidden"})
    optional_tensors = frozenset({"mask", "prompts"})


class Backward(Header):
    type: Literal["backward"] = "backward"
    grant: Grant | None = None
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    span: LayerRange
    required_tensors = frozenset({"hidden", "grad"})
    optional_tensors = frozenset({"mask", "prompts"})


class Error(Header):
    type: Literal["error"] = "error"
    code: Annotated[StrictStr, Field(max_length=64)]
    message: Annotated[StrictStr, Field(max_length=4096)]


AnyHeader = Open | Ready | Step | Result | Close | Forward | Backward | Error
_HEADERS: TypeAdapter[AnyHeader] = TypeAdapter(Annotated[AnyHeader, Field(discriminator="type")])
MESSAGE_TYPES = frozenset(h.model_fields["type"].default for h in
                          (Open, Ready, Step, Result, Close, Forward, Backward, Error))


@dataclass(frozen=True)
class Message:
    header: AnyHeader
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.header.type


def encode(header: Header, tensors: dict[str, torch.Tensor] | None = None, codec: str = "raw",
           compressed: frozenset[str] = frozenset({"hidden"})) -> bytes:
    """A frame of `header` and `tensors`; with codec "dyn8", the floating tensors named in
    `compressed` (hidden states; never gradients) travel as dyn8 (shared/codec.py)."""
    descriptors, payloads = [], []
    for name, tensor in (tensors or {}).items():
        tensor = tensor.detach().contiguous().cpu()
        payload = None
        if codec == "dyn8" and name in compressed and tensor.dtype in COMPRESSIBLE:
            payload = compress(tensor)  # None: non-finite values go raw, to be seen as such
        used = "raw" if payload is None else codec
        if payload is None:
            payload = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        descriptors.append({"name": name, "dtype": WIRE_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "codec": used, "nbytes": len(payload)})
        payloads.append(payload)
    fields = header.model_dump(mode="python")
    packed = msgpack.packb(fields | {"tensors": descriptors}, use_bin_type=True)
    return b"".join([_LENGTH.pack(len(packed)), packed, *payloads])


def error_frame(code: str, message: str) -> bytes:
    return encode(Error(code=code, message=message[:4096]))


def decode(frame: bytes, max_frame_bytes: int) -> Message:
    """Parse and validate a frame; raise ProtocolError on anything malformed, before allocating tensors."""
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
        fields = msgpack.unpackb(frame[_LENGTH.size:_LENGTH.size + header_len], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(fields, dict):
        raise ProtocolError("the header must be a map")
    descriptors = fields.pop("tensors", [])
    kind = fields.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {repr(kind)[:64]}")
    try:
        header = _HEADERS.validate_python(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "header"
        raise ProtocolError(f"bad {fields['type']} message: {where}: {first['msg']}") from None
    if not isinstance(descriptors, list) or len(descriptors) > MAX_TENSORS:
        raise ProtocolError(f"tensors must be a list of at most {MAX_TENSORS} descriptors")
    offset = _LENGTH.size + header_len
    tensors: dict[str, torch.Tensor] = {}
    allowed = header.required_tensors | header.optional_tensors
    for d in descriptors:
        name, dtype, shape, nbytes, codec = _check_descriptor(d)
        if name not in allowed or name in tensors:
            raise ProtocolError(f"a {header.type} message carries no tensor {name!r} "
                                f"(allowed: {', '.join(sorted(allowed)) or 'none'})")
        if offset + nbytes > len(frame):
            raise ProtocolError(f"tensor {name!r} runs past the end of the frame")
        if codec == "dyn8":
            try:
                tensors[name] = decompress(memoryview(frame)[offset:offset + nbytes], shape, dtype)
            except ValueError as exc:
                raise ProtocolError(f"tensor {name!r}: {exc}") from None
        else:
            buffer = bytearray(frame[offset:offset + nbytes])
            flat = torch.frombuffer(buffer, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
        offset += nbytes
    if offset != len(frame):
        raise ProtocolError(f"{len(frame) - offset} stray bytes after the tensors")
    missing = header.required_tensors - tensors.keys()
    if missing:
        raise ProtocolError(f"a {header.type} message needs the tensor(s) {', '.join(sorted(missing))}")
    return Message(header, tensors)


def _check_descriptor(d) -> tuple[str, torch.dtype, list[int], int, str]:
    if not isinstance(d, dict):
        raise ProtocolError("a tensor descriptor must be a map")
    name, dtype_name, shape, nbytes = d.get("name"), d.get("dtype"), d.get("shape"), d.get("nbytes")
    codec = d.get("codec", "raw")
    if not isinstance(name, str) or not isinstance(dtype_name, str) or not isinstance(codec, str) or \
            dtype_name not in WIRE_DTYPES or codec not in WIRE_CODECS or \
            (codec == "dyn8" and WIRE_DTYPES[dtype_name] not in COMPRESSIBLE):
        raise ProtocolError(f"bad tensor descriptor {repr(d)[:200]} (dtypes: {', '.join(WIRE_DTYPES)}; codecs: "
                            f"{', '.join(WIRE_CODECS)}, dyn8 for floating tensors only)")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ProtocolError(f"bad shape {repr(shape)[:200]} for tensor {name!r}")
    dtype = WIRE_DTYPES[dtype_name]
    numel = 1
    for s in shape:
        numel *= s
    want = payload_bytes(numel) if codec == "dyn8" else numel * dtype.itemsize
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes != want:
        raise ProtocolError(f"tensor {name!r}: {repr(nbytes)[:40]} bytes do not match shape {shape} of {dtype_name} "
                            f"({codec})")
    return name, dtype, shape, nbytes, codec
