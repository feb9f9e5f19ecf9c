"""Compiled decode steps: a span's one-token steps as one `torch.compile`d graph per row bucket.

Why: a decode step of a small model is bound by overhead, not by memory. Measured on this kind of
CPU (2 threads, SmolLM2's 210 projections of 30 layers, bfloat16, weights cold): eager `F.linear`
reads them at 9-10 GB/s (22.6 ms for one row, 29.2 ms for a 16-row tile), Inductor's C++ GEMM
template on frozen (prepacked) weights at 20-24 GB/s (8.3 ms for one row, 11.1 ms for four), and
the ~25 small ops around them per layer fuse into a few kernels.

How: the span's own `transformers` layers are traced with no cache object; their attention calls
the `corolla::decode_attention` custom op, which the compiler treats as opaque: at run time it
writes the new keys and values into each session's SpanCache and attends per session over its own
cache (shared/models/batch.py), exactly as the eager ragged path does. Everything else (norms,
projections, rotary, MLP) is compiled for a fixed number of rows, the bucket; a tick's decode rows
are packed into buckets, the last padded.

Batch invariance: the C++ GEMM template (the only backend offered; ATen's kernels reduce in an
order that depends on the row count) computes a row the same way in every bucket, which
`CompiledDecode.warm_up` checks bit for bit on random rows; buckets that disagree are dropped.
So a session's decode results are the same alone and in any company. Prompts (several tokens)
run eagerly, as before, in both cases.

Cost: compiling takes tens of seconds per bucket at start (cached on disk by Inductor under
~/.cache/corolla/inductor, so a second start is faster); `--no-compile` turns it off."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
from torch import nn

from shared.models.batch import ATTENTION, corolla_attention

log = logging.getLogger(__name__)

BUCKETS = (1, 4)  # rows per compiled decode graph (measured: 8.3 and 11.1 ms for SmolLM2's projections)
OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
_local = threading.local()


def _cache_dir() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/corolla/inductor"))


@torch.library.custom_op("corolla::decode_attention", mutates_args=())
def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                        scaling: float) -> torch.Tensor:
    """query [bucket, heads, 1, dim], key/value [bucket, kv_heads, 1, dim] -> [bucket, 1, heads, dim]:
    the real rows' new keys/values go into their sessions' caches, and each session attends over
    its own cache (the step's BatchView, set by CompiledDecode.run on this thread)."""
    step = _local.step
    rows = step.rows
    module = step.modules[layer]
    kwargs: dict = {}
    step.view.update(key[:rows], value[:rows], layer, kwargs=kwargs)
    out, _ = corolla_attention(module, query[:rows], key[:rows], value[:rows], None, scaling=scaling, **kwargs)
    if rows < query.shape[0]:
        out = torch.cat([out, out.new_zeros((query.shape[0] - rows,) + out.shape[1:])])
    return out.contiguous()


@decode_attention_op.register_fake
def _(query, key, value, layer, scaling):
    return query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))


# Measured (SmolLM2, 30 layers, bfloat16, 203 MiB of weights): compiling adds 376 MiB of compiler
# state once per process, and each bucket's graph a prepacked copy of the weights plus its buffers,
# 293 MiB (1.44x the weights). The eager weights stay: prompts use them.
FIXED_BYTES = 400 * 2**20
PER_BUCKET = 1.5


def compiled_extra_bytes(weight_bytes: int) -> int:
    """What compiling a span whose weights take `weight_bytes` adds to its memory (an estimate)."""
    return int(weight_bytes * PER_BUCKET * len(BUCKETS))


def refusal(family: str, quant: str, device: str) -> str | None:
    """Why spans of this family, quantization and device type are not compiled, or None if they are."""
    if family != "llama":
        return f"the {family} family's layers are not compiled yet"
    if quant != "none":
        return f"quantized ({quant}) layers are not compiled yet"
    if device != "cpu":
        return f"compiling for {device} is not supported yet"
    return None


def not_compilable(span) -> str | None:
    """Why this span's decode step cannot be compiled here, or None if it can."""
    why = refusal(span.family.name, span.quant, span.device.type)
    if why is None and span.config._attn_implementation != ATTENTION:
        why = "this span's attention is not batched"
    return why


class _Step:
    def __init__(self, view, rows: int, modules: dict[int, nn.Module]):
        self.view, self.rows, self.modules = view, rows, modules


class _DecodeGraph(nn.Module):
    """The span's layers for one decode token per row, attention through the custom op."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                           position_embeddings=(cos, sin), corolla_compiled=True)
        return hidden


class RowGraphs:
    """`module` compiled for a fixed number of rows (dim 0 of every input) per bucket: inputs of
    up to `max_rows` rows are padded to the next bucket, the output cut back to them."""

    def __init__(self, module: nn.Module, what: str, buckets: tuple[int, ...] | None = None):
        _cache_dir()
        self.graph = torch.compile(module, dynamic=False)
        self.what = what
        self.buckets = buckets or BUCKETS
        self.runs = 0  # graph calls (passes of up to max_rows rows)

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs[0].shape[0]
        size = next(b for b in self.buckets if b >= rows)
        if size > rows:
            inputs = tuple(torch.cat([t, t.new_zeros((size - rows,) + t.shape[1:])]) for t in inputs)
        self.runs += 1
        # freezing (weights as prepacked constants) is read from the global config, not from
        # torch.compile's options; patched around every call so that a recompile keeps it
        with torch.no_grad(), torch._inductor.config.patch(OPTIONS):
            return self.graph(*inputs)[:rows]

    def warm_up(self, run, progress=None) -> None:
        """Compile every bucket through run(rows) -> output of that many rows (random inputs, the
        same first rows for every bucket), and keep the buckets whose rows agree bit for bit with
        the largest one's."""
        results = {}
        for size in self.buckets:
            started = time.monotonic()
            if progress is not None:
                progress(size)
            results[size] = run(size)
            log.info("compiled %s for %d row(s) in %.1fs", self.what, size, time.monotonic() - started)
        largest = results[self.buckets[-1]]
        kept = tuple(b for b in self.buckets if torch.equal(results[b], largest[:b]))
        if kept != self.buckets:
            log.warning("compiled %s: buckets %s compute rows differently from the %d-row one; using %s only",
                        self.what, sorted(set(self.buckets) - set(kept)), self.buckets[-1], kept)
        self.buckets = kept


class CompiledDecode(RowGraphs):
    """Decode steps of a whole span through compiled graphs, one per row bucket."""

    def __init__(self, span):
        super().__init__(_DecodeGraph(span.layers), f"the decode step of layers [{span.start}, {span.end})")
        self.span = span
        self.modules = {span.start + i: layer.self_attn for i, layer in enumerate(span.layers)}

    def run(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, view) -> torch.Tensor:
        """hidden [rows, 1, hidden] (rows <= max_rows) with its rotary cos/sin [rows, 1, dim]; the
        sessions' caches are written through `view` (a BatchView of exactly these rows)."""
        _local.step = _Step(view, hidden.shape[0], self.modules)
        try:
            return self(hidden, cos, sin)
        finally:
            _local.step = None

    def warm_up(self, progress=None) -> None:
        span = self.span
        torch.manual_seed(0)
        rows = torch.randn(self.buckets[-1], 1, span.hidden_size, dtype=span.dtype, device=span.device)

        def run(size: int) -> torch.Tensor:
            caches = [span.new_cache(1, 8) for _ in range(size)]
            return torch.cat(span.step_batch(list(rows[:size, None]), caches, [None] * size))

        super().warm_up(run, progress)


class _Head(nn.Module):
    def __init__(self, ends):
        super().__init__()
        self.ends = ends

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ends.head_logits(hidden)


def compiled_head(ends) -> RowGraphs:
    """The final norm, LM head and logit transforms of `ends`, compiled for [rows, 1, hidden] (float32 logits)."""
    graphs = RowGraphs(_Head(ends), "the LM head")
    torch.manual_seed(0)
    weight = ends.head.weight
    rows = torch.randn(graphs.max_rows, 1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    graphs.warm_up(lambda size: graphs(rows[:size]))
    return graphs
