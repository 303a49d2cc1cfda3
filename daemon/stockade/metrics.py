"""Prometheus metrics (prometheus-client), served on a loopback port when asked for.

Off by default (`metrics_address`). Labels are server names and decisions only, never
identities or tool arguments: the endpoint has no authentication, so it is bound to a
loopback address and says nothing a local user could not learn from `stockade status`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

SESSIONS = Gauge("stockade_sessions_open", "Host sessions open now", ["server"], registry=REGISTRY)
REQUESTS = Counter(
    "stockade_requests_total",
    "Host requests by the policy's decision",
    ["server", "decision"],
    registry=REGISTRY,
)
RELAY_LATENCY = Histogram(
    "stockade_relay_latency_seconds",
    "From forwarding an allowed request to relaying its answer",
    ["server"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
CONTAINERS = Counter(
    "stockade_container_events_total",
    "Sandbox containers started, stopped, crashed and OOM-killed",
    ["server", "event"],
    registry=REGISTRY,
)
AUDIT_WRITE = Histogram(
    "stockade_audit_write_seconds",
    "Time to append one audit record (fsync excluded: it is grouped)",
    buckets=(0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01),
    registry=REGISTRY,
)
NOTIFICATIONS_DROPPED = Counter(
    "stockade_server_notifications_dropped_total",
    "Server notifications dropped past server_notifications_per_second",
    ["server"],
    registry=REGISTRY,
)
AUDIT_FSYNC = Histogram(
    "stockade_audit_fsync_seconds",
    "Time of one audit fsync (a denial waits for one)",
    buckets=(0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    registry=REGISTRY,
)


class PoolCollector(Collector):
    """Pool levels and instance counts, read from the supervisor at scrape time."""

    def __init__(self, levels: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        self._levels = levels  # (server, pooled, wanted, in use)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        pooled = GaugeMetricFamily("stockade_pool_ready", "Warm instances ready", labels=["server"])
        wanted = GaugeMetricFamily("stockade_pool_size", "Warm pool size asked", labels=["server"])
        in_use = GaugeMetricFamily(
            "stockade_instances_in_use", "Instances serving", labels=["server"]
        )
        for server, ready, size, serving in list(self._levels()):
            pooled.add_metric([server], ready)
            wanted.add_metric([server], size)
            in_use.add_metric([server], serving)
        return [pooled, wanted, in_use]


def serve(address: str, levels: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
    """Start the /metrics endpoint (a daemon thread of prometheus-client)."""
    REGISTRY.register(PoolCollector(levels))
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]"), registry=REGISTRY)
