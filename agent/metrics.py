"""`GET /metrics` in Prometheus's text format: backlogs, lane states, parked sales, latencies.

The counts come from the outbox when Prometheus scrapes (so they are right after a restart); the
latency histograms are observed as sales are answered and as KRA answers. One registry per app,
not the library's global one, so two agents (or tests) in one process never mix their figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.queue.outbox import Outbox

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROUND_TRIP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, outbox: Outbox, clock: Callable[[], datetime]) -> None:
        self.registry = CollectorRegistry()
        self._lanes: Callable[[], dict[str, Any]] = dict
        self.intake_latency = Histogram("etims_intake_seconds", "Time to answer a till's sale (HTTP or serial).",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.kra_round_trip = Histogram("etims_kra_round_trip_seconds", "KRA's answer time to a sale.",
                                        buckets=ROUND_TRIP_BUCKETS, registry=self.registry)
        self.registry.register(_OutboxCollector(outbox, clock, lambda: self._lanes()))

    def bind_lanes(self, lanes: Callable[[], dict[str, Any]]) -> None:
        """`lanes`: the lane states as /v1/status reports them (kra, tsms: {"state": ...})."""
        self._lanes = lanes

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _OutboxCollector(Collector):
    def __init__(self, outbox: Outbox, clock: Callable[[], datetime], lanes: Callable[[], dict[str, Any]]) -> None:
        self._outbox, self._clock, self._lanes = outbox, clock, lanes

    def collect(self) -> Iterator[Metric]:
        stats = self._outbox.stats()
        unsigned, oldest = self._outbox.unsigned()
        sales = GaugeMetricFamily("etims_sales", "Sales and credit notes in the outbox by KRA lane state.",
                                  labels=["state"])
        for state, count in sorted(stats.kra.items()):
            sales.add_metric([state], count)
        yield sales
        tsms = GaugeMetricFamily("etims_tsms_sales", "Sales by head-office sync state.", labels=["state"])
        for state, count in sorted(stats.tsms.items()):
            tsms.add_metric([state], count)
        yield tsms
        yield GaugeMetricFamily("etims_kra_backlog", "Sales waiting for KRA's signature.", value=unsigned)
        yield GaugeMetricFamily("etims_kra_parked", "Sales KRA refused, set aside for a technician.",
                                value=stats.kra.get("parked", 0))
        age = 0.0 if oldest is None else max(0.0, (self._clock() - oldest).total_seconds())
        yield GaugeMetricFamily("etims_kra_oldest_unsigned_age_seconds", "Age of the oldest unsigned sale.",
                                value=age)
        up = GaugeMetricFamily("etims_lane_up", "1 when a lane's upstream answers.", labels=["lane"])
        for lane, state in sorted(self._lanes().items()):
            up.add_metric([lane], 1.0 if state.get("state") == "online" else 0.0)
        yield up
