"""Compute dtypes by name: one table for settings, flags, the wire and the adapters."""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]  # 'auto': see resolve_dtype
DTYPE_CHOICES: tuple[str, ...] = get_args(DtypeChoice)
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}
_NAMES = {v: k for k, v in COMPUTE_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX (elsewhere torch emulates bfloat16 on the CPU, slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str, config, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto': the checkpoint's float16 or bfloat16 where the device runs it natively; otherwise
    bfloat16 where the device has native bfloat16 (GPUs, CPUs with AVX512-BF16 or AMX: half the
    bytes per weight, and a decode step is bound by those bytes), else float32. As vLLM's 'auto',
    with the CPU's capabilities taken into account as llama.cpp does."""
    from shared.errors import BadRequest

    if name == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = COMPUTE_DTYPES.get(dtype)
        native = native_bfloat16(device)
        if dtype == torch.float16 and torch.device(device).type == "cuda":
            return dtype
        return torch.bfloat16 if native else torch.float32
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise BadRequest(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}") from None
