"""The gateway's Prometheus metrics (GET /metrics): requests by route and status, tokens in and
out, time to first token, inter-token latency and whole-request time, the admission queue,
failovers, preemptions, bans and the swarm's servers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.generation import Event, TextDelta, Usage
from shared.metrics import LATENCY_BUCKETS, Snapshot


class GatewayMetrics:
    def __init__(self, state):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("corolla_gateway_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.prompt_tokens = Counter("corolla_gateway_prompt_tokens", "prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("corolla_gateway_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("corolla_gateway_time_to_first_token_seconds", "from a request's arrival to its "
                              "first generated text", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("corolla_gateway_inter_token_latency_seconds", "between consecutive pieces of one "
                             "choice's generated text", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("corolla_gateway_request_seconds", "from a generation request's arrival to its "
                             "last event", buckets=LATENCY_BUCKETS, registry=r)
        r.register(Snapshot(lambda: _state_metrics(state), {"corolla_gateway_failover_events": "kind"}))

    async def observe(self, events: AsyncIterator[Event], started: float) -> AsyncIterator[Event]:
        """Pass a generation's events through, timing its text and counting its tokens."""
        last: dict[int, float] = {}
        try:
            async for event in events:
                if isinstance(event, TextDelta) and event.text:
                    now = time.monotonic()
                    if not last:
                        self.ttft.observe(now - started)
                    elif event.index in last:
                        self.itl.observe(now - last[event.index])
                    last[event.index] = now
                elif isinstance(event, Usage):
                    self.prompt_tokens.inc(event.prompt_tokens)
                    self.generation_tokens.inc(event.completion_tokens)
                yield event
        finally:
            self.e2e.observe(time.monotonic() - started)


def _state_metrics(state):
    swarm, admission = state.swarm, state.admission
    yield "gauge", "corolla_gateway_queue_length", "requests waiting for room on the swarm", admission.waiting
    yield "counter", "corolla_gateway_admitted", "requests admitted to the swarm", admission.admitted
    yield "counter", "corolla_gateway_refused", "requests refused with 429 (queue full or wait too long)", \
        admission.refused
    yield "counter", "corolla_gateway_failover_events", "hops that failed, were recovered, were given up, moved " \
        "without a fault, and generations preempted and recomputed", asdict(swarm.failovers)
    yield "gauge", "corolla_gateway_banned_servers", "blockservers banned from routing now", len(swarm.bans.active())
    yield "gauge", "corolla_gateway_servers_online", "blockservers of this model online", len(swarm.online())


class RequestMetrics:
    """ASGI middleware counting every HTTP response by its route's path template (unmatched paths
    count as 'other', so a scanner cannot grow the label set) and status."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), scope["method"], str(status["code"])).inc()
