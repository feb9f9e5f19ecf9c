"""Quantized weights for a span's decoder layers, applied on load (`--quant`).

- `int8`: on CUDA, bitsandbytes' LLM.int8 (`Linear8bitLt`, outlier threshold 6.0), as PETALS.
  On CPU, weight-only int8 with one symmetric scale per output channel (`Int8Linear`): a decode
  step's few rows in bfloat16 go through torch's int8-weight kernel (faster than dense bf16 on
  this kind of CPU), larger batches dequantize the weight first. Activations are never quantized:
  dynamic int8 activations wreck SmolLM2's top-1 agreement (massive activations; measured in
  ../shared/reviews/batching-notes.md, section C).
- `int4`: CPU, weight-only 4-bit with a float scale and offset per group of 32-128 inputs
  (`Int4Linear`, the layout of torch's int4-weight kernel, `_weight_int4pack_mm_for_cpu`): a decode
  step's rows go through that kernel (2.5x faster than dense bf16 for a 3072x576 weight, cold), a
  prompt's dequantize. On CUDA use nf4.
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
from shared.models.rows import DECODE, PREFILL_TILE, planned

QuantMode = Literal["none", "int8", "int4", "nf4"]
QUANT_MODES: tuple[str, ...] = ("none", "int8", "int4", "nf4")
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
        packed = x.device.type == "cpu" and x.dtype == torch.bfloat16  # the kernel's only case
        plan = planned(x)
        if plan is not None and packed:  # decode rows through the row-invariant kernel, prompts dequantized
            y = plan.apply(x, self._product, {DECODE: 0, "prefill": PREFILL_TILE})
            if y is not None:
                return y
        rows = x.numel() // x.shape[-1]
        if packed and rows <= INT8PACK_MAX_ROWS and not (x.requires_grad and torch.is_grad_enabled()):
            return self._product(x.reshape(rows, -1), DECODE).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _product(self, rows: torch.Tensor, kind: str) -> torch.Tensor:
        if kind != DECODE:
            return F.linear(rows, self.dequantized(rows.dtype), None if self.bias is None else self.bias.to(rows.dtype))
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scale.to(rows.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


INT4_BLOCK_N = 64  # output rows per block of the kernel's packed layout


def int4_group_size(in_features: int) -> int | None:
    """The inputs sharing one scale and offset: the largest of 128, 64, 32 that divides the row."""
    return next((g for g in (128, 64, 32) if in_features % g == 0), None)


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W stored as 4-bit codes q in [0, 16) and, per output row and group of
    `group_size` inputs, a scale s and a minimum m: Ŵ = q·s + m (the kernel's (q − 8)·s + z with
    z = m + 8s), |W − Ŵ| ≤ s / 2. Codes are packed in the layout of torch's CPU int4 kernel:
    per block of 64 output rows, byte [k, j] holds row j (low nibble) and row j + 32 (high) of
    column k. Output rows are padded to whole blocks with zero rows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = int4_group_size(self.in_features)
        padded_out = -(-self.out_features // INT4_BLOCK_N) * INT4_BLOCK_N
        weight = torch.zeros(padded_out, self.in_features)
        weight[:self.out_features] = linear.weight.detach().float()
        groups = weight.reshape(padded_out, -1, self.group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(
            codes.reshape(padded_out, self.in_features), 1))
        # [groups, out, 2]: (scale, offset of code 8), what the kernel takes
        self.register_buffer("scales_and_zeros", torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._by_dtype: dict[torch.dtype, torch.Tensor] = {}

    def codes(self) -> torch.Tensor:
        """The 4-bit codes [padded out, in] unpacked from the kernel's layout."""
        blocks = self.weight_int4.to(torch.int32).reshape(-1, self.in_features, INT4_BLOCK_N // 2)
        both = torch.cat([blocks & 0xF, blocks >> 4], dim=2)  # [block, k, 64 rows]
        return both.transpose(1, 2).reshape(-1, self.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        scale, zero = self.scales_and_zeros.unbind(-1)  # [groups, out]
        codes = self.codes().reshape(-1, self.in_features // self.group_size, self.group_size).float()
        weight = (codes - 8) * scale.t()[..., None] + zero.t()[..., None]
        return weight.reshape(-1, self.in_features)[:self.out_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = planned(x)
        if plan is not None:  # decode rows through the row-invariant kernel, prompts dequantized
            y = plan.apply(x, self._product, {DECODE: 0, "prefill": PREFILL_TILE})
            if y is not None:
                return y
        rows = x.numel() // x.shape[-1]
        if rows <= INT8PACK_MAX_ROWS and not (x.requires_grad and torch.is_grad_enabled()):
            return self._product(x.reshape(rows, -1), DECODE).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _product(self, rows: torch.Tensor, kind: str) -> torch.Tensor:
        if kind != DECODE:
            return F.linear(rows, self.dequantized(rows.dtype), None if self.bias is None else self.bias.to(rows.dtype))
        sz = self._by_dtype.get(rows.dtype)
        if sz is None:
            sz = self._by_dtype[rows.dtype] = self.scales_and_zeros.to(rows.dtype)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.weight_int4, self.group_size, sz)[:, :self.out_features]
        return y if self.bias is None else y + self.bias.to(rows.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _bitsandbytes():
    # its CPU backend warns at import that an optional hub kernel is absent; it has its own
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def check_quant(mode: str, device: str | torch.device) -> None:
    """Refuse a mode this machine cannot run, with the reason, before anything is loaded."""
    if mode not in QUANT_MODES:
        raise BadRequest(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if mode == "int4" and torch.device(device).type != "cpu":
        raise BadRequest("--quant int4 runs on the CPU (torch's int4-weight CPU kernel); on a GPU use --quant nf4")
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
                if isinstance(child, nn.Linear) and not _custom_forward(child) and _quantizable(child, mode):
                    setattr(module, child_name, _quantized(child, mode, device, dtype))
    return layer.to(device)


def _custom_forward(linear: nn.Linear) -> bool:
    # Falcon's FalconLinear only reorders the same matmul; anything else would be lost by a swap
    return type(linear).forward is not nn.Linear.forward and type(linear).__name__ != "FalconLinear"


def _quantizable(linear: nn.Linear, mode: str) -> bool:
    """int4 needs whole groups of inputs per row; a Linear without them stays in the compute dtype."""
    return mode != "int4" or int4_group_size(linear.in_features) is not None


def _quantized(linear: nn.Linear, mode: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if mode == "int8" and device.type != "cuda":
        return Int8Linear(linear)
    if mode == "int4":
        return Int4Linear(linear)
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
    if mode == "int4":
        group = int4_group_size(in_features)
        if group is None:
            return n * dtype.itemsize
        padded = -(-out_features // INT4_BLOCK_N) * INT4_BLOCK_N * in_features
        return padded // 2 + 8 * padded // group  # two codes per byte, a float32 scale and offset per group
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
