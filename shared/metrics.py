"""Prometheus metrics shared by both roles (prometheus_client): a registry per app (tests run
several apps in one process), values read from the live state at scrape time, the latency
buckets, and the /metrics response.

Counters and gauges that the code already keeps (queue length, failover counts, free cache) are
read when Prometheus scrapes, through `Snapshot`, rather than mirrored into a second set of
variables that could drift from them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# seconds: from a sub-millisecond local step to a minute-long prompt over a slow link
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Snapshot(Collector):
    """Metrics computed from the app's state on each scrape: `read()` yields (kind, name, help,
    value) with kind 'gauge' or 'counter'; a value may be a number or {label value: number} for
    one label named by `labels[name]`."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, str, object]]], labels: dict[str, str] = None):
        self._read, self._labels = read, labels or {}

    def collect(self) -> Iterable[Metric]:
        for kind, name, doc, value in self._read():
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            label = self._labels.get(name)
            if label is None:
                yield family(name, doc, value=float(value))
                continue
            metric = family(name, doc, labels=[label])
            for key, v in value.items():
                metric.add_metric([str(key)], float(v))
            yield metric


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
