"""Quantized weights for a span's decoder layers, applied on load (`--quant`).

- `int8`: on CUDA, bitsandbytes' LLM.int8 (`Linear8bitLt`, outlier threshold 6.0), as PETALS.
  On CPU, weight-only int8 with one symmetric scale per output channel (`Int8Linear`): a decode
  step's few rows in bfloat16 go through torch's int8-weight kernel (faster than dense bf16 on
  this kind of CPU), larger batches dequantize the weight first. Activations are never quantized:
  dynamic int8 activations wreck SmolLM2's top-1 agreement (massive activations; measured in
  ../shared/reviews/batching-notes.md, section C).
- `nf4`: bitsandbytes' 4-bit NormalFloat with blocks of 64 (`Linear4bit`), on CUDA and on CPU
  (bitsandbytes >= 0.48 ships CPU kernels); slower than bf16 on CPU, but a quarter of its memory.

Only `nn.Linear` modules inside decoder layers are replaced: norms, biases and fused MoE expert
tensors stay in the compute dtype, and the model's ends (embeddings, LM head) on the gateway are
never quantized."""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import BadRequest

QuantMode = Literal["none", "int8", "nf4"]
QUANT_MODES: tuple[str, ...] = ("none", "int8", "nf4")
NF4_BLOCK = 64
INT8PACK_MAX_ROWS = 4  # up to this many rows the int8-weight kernel beats dequantize-then-matmul


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 [out, in] and a float32 scale per output row:
    W ≈ weight_int8 · scale[:, None], |W − Ŵ| ≤ scale / 2 elementwise."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= INT8PACK_MAX_ROWS and \
                not (x.requires_grad and torch.is_grad_enabled()):  # the kernel has no backward
            y = torch._weight_int8pack_mm(x.reshape(rows, -1), self.weight_int8, self.scale.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _bitsandbytes():
    # its CPU backend warns at import that an optional hub kernel is absent; it has its own
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def check_quant(mode: str, device: str | torch.device) -> None:
    """Refuse a mode this machine cannot run, with the reason, before anything is loaded."""
    if mode not in QUANT_MODES:
        raise BadRequest(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    needs_bnb = mode == "nf4" or (mode == "int8" and torch.device(device).type == "cuda")
    if needs_bnb:
        try:
            _bitsandbytes()
        except ImportError as exc:
            raise BadRequest(f"--quant {mode} on {device} needs bitsandbytes >= 0.48: pip install bitsandbytes") from exc


def quantize_layer(layer: nn.Module, mode: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Replace every nn.Linear in `layer` (weights on the CPU, in `dtype`) by its quantized form,
    then move the layer to `device`. Returns the layer."""
    device = torch.device(device)
    if mode != "none":
        for module in list(layer.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not _custom_forward(child):
                    setattr(module, child_name, _quantized(child, mode, device, dtype))
    return layer.to(device)


def _custom_forward(linear: nn.Linear) -> bool:
    # Falcon's FalconLinear only reorders the same matmul; anything else would be lost by a swap
    return type(linear).forward is not nn.Linear.forward and type(linear).__name__ != "FalconLinear"


def _quantized(linear: nn.Linear, mode: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if mode == "int8" and device.type != "cuda":
        return Int8Linear(linear)
    bnb = _bitsandbytes()

    has_bias = linear.bias is not None
    if mode == "int8":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(linear.weight.detach().to(dtype), requires_grad=False,
                                       has_fp16_weights=False)
    else:
        # float32 block scales (no nested quantization of the scales): 0.5625 bytes per weight,
        # what memory accounting counts on every device
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8)
        new.weight = bnb.nn.Params4bit(linear.weight.detach().to(dtype), requires_grad=False, quant_type="nf4",
                                       blocksize=NF4_BLOCK, compress_statistics=False)
        if linear.in_features % NF4_BLOCK:  # bitsandbytes' packed CPU kernel needs whole blocks per row
            new.support_avx512bf16_for_cpu = False
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes as the weight moves


def linear_weight_bytes(out_features: int, in_features: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes a Linear's weight takes in `mode` (what the loader allocates, to size spans)."""
    n = out_features * in_features
    if mode == "int8":
        return n + 4 * out_features  # int8 values and a float32 scale per row (LLM.int8 keeps the same)
    if mode == "nf4":
        return n // 2 + 4 * -(-n // NF4_BLOCK)  # two values per byte and a float32 absmax per block
    return n * dtype.itemsize


def module_bytes(module: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Bytes of a (meta) module's weights once loaded in `dtype` with quantization `mode`."""
    total = 0
    linear_weights = set()
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and not _custom_forward(sub):
            total += linear_weight_bytes(sub.out_features, sub.in_features, mode, dtype)
            linear_weights.add(id(sub.weight))
    return total + sum(p.numel() * dtype.itemsize for p in module.parameters() if id(p) not in linear_weights)


def stored_bytes(module: nn.Module) -> int:
    """Bytes a loaded module's weights actually occupy: parameters and buffers, plus the scales
    bitsandbytes keeps beside its quantized weights (NF4 block absmax, LLM.int8 row scales)."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        scales = getattr(tensor, "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total
