"""Compute dtypes by name: one table for settings, flags, the wire and the adapters."""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]  # 'auto': the checkpoint's own
DTYPE_CHOICES: tuple[str, ...] = get_args(DtypeChoice)
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}
_NAMES = {v: k for k, v in COMPUTE_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def resolve_dtype(name: str, config) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float32 if it names none or an unsupported one)."""
    from shared.errors import BadRequest

    if name == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = COMPUTE_DTYPES.get(dtype)
        return dtype if dtype in _NAMES else torch.float32
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise BadRequest(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}") from None
