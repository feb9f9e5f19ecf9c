"""The blockserver's Prometheus metrics (GET /metrics): step latency by kind (decode, prefill,
forward, backward; from arrival to result, queueing included), the KV cache's use, sessions, and
the compute ticks that batched them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from shared.metrics import LATENCY_BUCKETS, Snapshot


class BlockserverMetrics:
    def __init__(self, service):
        self.registry = r = CollectorRegistry()
        self.steps = Histogram("corolla_blockserver_step_seconds", "one step or stateless pass of a session on this "
                               "server's layers, queueing included", ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(Snapshot(lambda: _state_metrics(service)))

    def attach(self, runtime) -> None:
        """Time `runtime`'s steps (a new runtime comes with each span the server loads)."""
        runtime.timed = lambda kind, seconds: self.steps.labels(kind).observe(seconds)


def _state_metrics(service):
    runtime = service.runtime
    span = service.span
    yield "gauge", "corolla_blockserver_layers", "layers this server serves now", 0 if span is None else len(span)
    if runtime is None:
        return
    yield "gauge", "corolla_blockserver_cache_tokens", "KV-cache budget in tokens", runtime.cache_tokens
    yield "gauge", "corolla_blockserver_cache_tokens_used", "KV-cache tokens held by sessions and passes now", \
        runtime.cache_tokens - runtime.cache_tokens_left
    yield "gauge", "corolla_blockserver_sessions", "inference sessions open now", len(runtime.open_sessions())
    yield "counter", "corolla_blockserver_sessions_opened", "sessions opened on the current span", \
        runtime.sessions_opened
    yield "counter", "corolla_blockserver_ticks", "compute ticks (each one pass over the weights for every " \
        "waiting step)", runtime.scheduler.ticks
    yield "counter", "corolla_blockserver_tick_steps", "steps run by those ticks", runtime.scheduler.items
