"""Numbers from a load run: Prometheus text, histogram buckets, quantiles of samples.

One method for quantiles of samples throughout (`quantile`): the sample at index
floor(q * n) of the sorted samples, the last one for q = 1. That is the smallest sample
with more than a fraction q of the samples at or below it: always a value that was
observed, never an interpolation between two, and the rule Locust uses for its own
percentiles, so client figures read the same whether Locust or this module made them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Buckets = list[tuple[float, float]]  # cumulative (upper bound, count), bounds ascending


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample of a Prometheus text exposition."""

    name: str
    labels: Labels
    value: float

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


def parse_prometheus(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition, in order (prometheus_client's parser)."""
    return [
        Sample(s.name, tuple(s.labels.items()), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _matches(sample: Sample, where: Mapping[str, str] | None) -> bool:
    return not where or all(sample.label(k) == v for k, v in where.items())


def histogram_buckets(
    samples: Iterable[Sample], name: str, where: Mapping[str, str] | None = None
) -> Buckets:
    """Cumulative (upper bound, count) of histogram `name`, summed over matching series."""
    counts: dict[float, float] = {}
    for s in samples:
        le = s.label("le")
        if s.name == f"{name}_bucket" and le is not None and _matches(s, where):
            bound = float(le)  # "+Inf" too
            counts[bound] = counts.get(bound, 0.0) + s.value
    return sorted(counts.items())


def counter_total(
    samples: Iterable[Sample], name: str, where: Mapping[str, str] | None = None
) -> float:
    """Sum of a counter's matching series (`name` with or without `_total`)."""
    names = {name, name.removesuffix("_total") + "_total"}
    return sum(s.value for s in samples if s.name in names and _matches(s, where))


def gauge_max(
    samples: Iterable[Sample], name: str, where: Mapping[str, str] | None = None
) -> float | None:
    """The largest value of a gauge's matching series (one per worker pid), else None."""
    return max((s.value for s in samples if s.name == name and _matches(s, where)), default=None)


def bucket_delta(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]
) -> Buckets:
    """Cumulative buckets of what a histogram observed between two scrapes."""
    old = dict(before)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in after]


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Estimate quantile `q` from cumulative buckets, interpolating linearly inside one.

    As Prometheus' histogram_quantile: the first bucket interpolates from 0, and a
    quantile in the +Inf bucket is reported as the largest finite bound. None if empty.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def highest_bucket(buckets: Sequence[tuple[float, float]]) -> float | None:
    """Upper bound of the highest bucket holding an observation (inf past the last finite
    bound): a ceiling on the largest value observed. None if the histogram is empty."""
    highest, previous = None, 0.0
    for bound, count in buckets:
        if count > previous:
            highest = bound
        previous = count
    return highest


def quantile(samples: Iterable[float], q: float) -> float:
    """Quantile `q` (0 to 1) of non-empty samples, by the module's one method (above)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tail_summary(samples: Iterable[float]) -> dict[str, float | None]:
    """p50, p99, p99.9, max and count, in the samples' unit; None if empty."""
    ordered = sorted(samples)
    if not ordered:
        return {"p50": None, "p99": None, "p99_9": None, "max": None, "n": 0}
    return {
        "p50": quantile(ordered, 0.5),
        "p99": quantile(ordered, 0.99),
        "p99_9": quantile(ordered, 0.999),
        "max": ordered[-1],
        "n": len(ordered),
    }
