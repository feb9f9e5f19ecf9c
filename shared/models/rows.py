"""Batch-invariant products: a row's result never depends on what else is in the batch.

A GEMM's reduction order depends on its shape: the same row multiplied alone, beside three other
sessions' rows or beside a prompt's 500 rows comes out with different rounding (in bfloat16 the
difference flips greedy tokens within a few dozen steps). Measured on this kind of CPU (torch
2.13, oneDNN/MKL, 2 threads), the result of a row is the same bit for bit whatever the other
rows and its place among them *as long as the product has the same number of rows*. So each step
tells its Linear layers which of its rows are decode tokens and which are prompt tokens
(`row_plan`), and the layers run them in tiles of a fixed number of rows, the last one padded:

- decode rows: tiles of `DECODE_TILE[dtype]` rows. In bfloat16 a 16-row product costs what a
  1-row one does (the weights' bytes bound both: 98 vs 100 us for a 960x576 weight, 1.44 vs 1.48
  ms for 4096x4096, cold caches); in float32 MKL's cost doubles past 2 rows, so its tile is 2.
- prompt rows: tiles of `PREFILL_TILE` rows (compute-bound, so big tiles keep the GEMMs efficient).
- kernels whose rows are independent by construction (torch's int8- and int4-weight kernels
  loop over rows) take their rows untiled.

Everything else a layer does (norms, rotary, activations, attention per session) already works
row by row. What it costs is measured by `bench/concurrency.py --no-batch-invariant`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

DECODE_TILE = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 2}
PREFILL_TILE = 128
DECODE, PREFILL = "decode", "prefill"

_local = threading.local()


class RowPlan:
    """The rows of one step, in order: segments of (count, kind)."""

    def __init__(self, segments: list[tuple[int, str]]):
        merged: list[list] = []
        for count, kind in segments:
            if count <= 0:
                continue
            if merged and merged[-1][1] == kind:
                merged[-1][0] += count
            else:
                merged.append([count, kind])
        self.segments = [(c, k) for c, k in merged]
        self.rows = sum(c for c, _ in self.segments)

    def apply(self, x: torch.Tensor, product: Callable[[torch.Tensor, str], torch.Tensor],
              tiles: dict[str, int]) -> torch.Tensor | None:
        """product(rows [n, in], kind) -> [n, out] over x [..., in] by segments and tiles (0: the
        kernel is row-invariant, one call per segment). None if x is not this plan's rows (a
        layer that multiplies a subset of them, such as a MoE expert: it runs as it would)."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.rows:
            return None
        outs, start = [], 0
        for count, kind in self.segments:
            seg = flat[start:start + count]
            start += count
            tile = tiles[kind]
            if tile == 0 or count == tile:
                outs.append(product(seg, kind))
                continue
            padded = F.pad(seg, (0, 0, 0, -count % tile))
            parts = [product(t, kind) for t in padded.split(tile)]
            outs.append((parts[0] if len(parts) == 1 else torch.cat(parts))[:count])
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y.reshape(*x.shape[:-1], y.shape[-1])


@contextmanager
def row_plan(segments: list[tuple[int, str]] | None) -> Iterator[None]:
    """Within: the Linear layers of this thread run `segments` batch-invariantly (None: as they would)."""
    previous = getattr(_local, "plan", None)
    _local.plan = None if segments is None else RowPlan(segments)
    try:
        yield
    finally:
        _local.plan = previous


def current_plan() -> RowPlan | None:
    return getattr(_local, "plan", None)


def planned(x: torch.Tensor) -> RowPlan | None:
    """The plan to follow for x: none when autograd records (fine-tuning's backward recomputes)."""
    plan = getattr(_local, "plan", None)
    if plan is None or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return plan


def dense_tiles(dtype: torch.dtype) -> dict[str, int]:
    return {DECODE: DECODE_TILE.get(dtype, 16), PREFILL: PREFILL_TILE}


class TiledLinear(nn.Linear):
    """nn.Linear that follows the step's row plan. Made by changing a loaded Linear's class
    (`make_tiled`): same parameters, same state dict, no copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = None if torch.compiler.is_compiling() else planned(x)  # compiled: the graph's rows are the tile
        if plan is not None:
            y = plan.apply(x, lambda rows, kind: F.linear(rows, self.weight, self.bias), dense_tiles(x.dtype))
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)


def make_tiled(module: nn.Module) -> nn.Module:
    """Turn every plain nn.Linear inside `module` (itself included) into a TiledLinear, in place."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = TiledLinear
    return module
