"""The consumer's Prometheus metrics (`features_stream_*`), on a registry of its own.

They are read from the consumer's totals when scraped: nothing on the consumer's path
changes, and no value goes through prometheus_client's value classes, so none is ever
written to a multiprocess directory (the service's, if PROMETHEUS_MULTIPROC_DIR leaked
into the consumer's environment: `__main__` also re-executes without it).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from features.stream.consumer import DEAD_REASONS, VelocityConsumer

EVENT_OUTCOMES = ("read", "new", "duplicate", "late", "claimed")
"""The `outcome` label of features_stream_events_total: the consumer's log-line counts."""


class ConsumerCollector(Collector):
    """Exports one consumer's totals, and the group's lag and pending count."""

    def __init__(self, consumer: VelocityConsumer) -> None:
        self._consumer = consumer

    def collect(self) -> Iterator[Metric]:
        totals = self._consumer.totals
        events = CounterMetricFamily(
            "features_stream_events",
            "Stream entries this consumer read, and what their events did to the logs;"
            " claimed: taken over from a consumer that died or stalled",
            labels=["outcome"],
        )
        for outcome in EVENT_OUTCOMES:
            events.add_metric([outcome], getattr(totals, outcome))
        yield events
        dead = CounterMetricFamily(
            "features_stream_dead_letters",
            "Entries moved to the dead-letter stream, by reason",
            labels=["reason"],
        )
        for reason in DEAD_REASONS:
            dead.add_metric([reason], self._consumer.dead_totals[reason])
        yield dead
        yield CounterMetricFamily(
            "features_stream_failures",
            "Failed batches (a read, script or write that raised) plus events whose script"
            " failed: each is retried",
            value=totals.failed,
        )
        yield CounterMetricFamily(
            "features_stream_backing_skipped",
            "Velocity rows the backing store did not take: it held a newer version",
            value=totals.older,
        )
        for name, value, meaning in (
            ("lag", self._consumer.lag, "Entries in the stream not yet read by the group"),
            ("pending", self._consumer.pending, "Entries read by the group, not acknowledged"),
        ):
            if value is not None:  # absent where Redis cannot tell (lag: before Redis 7)
                yield GaugeMetricFamily(
                    f"features_stream_{name}",
                    f"{meaning} (XINFO GROUPS, once per report interval)",
                    value=value,
                )


def consumer_registry(consumer: VelocityConsumer) -> CollectorRegistry:
    """A registry holding the consumer's metrics and its process's (`process_*`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConsumerCollector(consumer))
    ProcessCollector(registry=registry)
    return registry
