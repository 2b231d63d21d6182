"""Feature health: what the store served per group, by source, which groups and features
went out as defaults and why, which were stale, and how old the served values were.

The request path only appends to two lists per served group (which read, how old); `flush`
turns them into counts with numpy and writes them to the Prometheus children, at most once
per interval. A Prometheus call costs ~0.5 us in process and ~1-2.5 us in multiprocess mode
(a locked write to its mmapped file), and this would be several calls for every group of
every request; a Python bisect for the age bucket alone cost ~0.25 us per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from features import metrics
from features.online.entry import Reason, Source
from features.online.reads import Codec

MAX_PENDING = 65_536
"""Served groups logged before a flush is due whatever the interval: bounds the lists."""


class HealthTally:
    """What one store served since the last flush, one entry per row and group.

    `slots[i]` is `read_slot * len(codecs) + group`, where `group` is the group's index in
    `codecs` and `read_slot` is `2 * read_id` for a read as read or `2 * read_id + 1` as
    served from the cache (`codec.reads[read_id]`'s pair, flattened); `ages[i]` is the
    wall clock when served minus its event time, NaN when it has none (defaults). The store
    appends to both; what a read means (its source, defaulted features and reason) is
    worked out in `flush`, once per read and interval.
    """

    def __init__(self, codecs: Sequence[Codec]) -> None:
        self.slots: list[int] = []
        self.ages: list[float] = []
        self._codecs = tuple(codecs)
        # Bound once: every series exists from the start, so rates read 0, not absent.
        self._served_to = [
            {source: metrics.SERVED.labels(c.name, source) for source in Source} for c in codecs
        ]
        self._defaults_to = [
            {
                (feature, reason): metrics.FEATURE_DEFAULTS.labels(c.name, feature, reason)
                for reason in Reason
                for feature in c.spec.field_names
            }
            for c in codecs
        ]
        # The per-group counts of defaults and stale values, from the same log.
        self._group_defaults_to = [
            {reason: metrics.DEFAULTS.labels(c.name, reason) for reason in Reason} for c in codecs
        ]
        self._stale_to = [
            {source: metrics.STALE.labels(c.name, source) for source in Source} for c in codecs
        ]
        self._bounds = np.array([*metrics.AGE_BUCKETS_S, math.inf], dtype=np.float64)
        self._ages_to = []
        for codec in codecs:
            age = metrics.SERVED_AGE.labels(codec.name)
            # prometheus_client has no call that adds n observations at once: the
            # histogram's per-bucket values (not cumulative) and its sum are written
            # directly. tests/test_health.py checks the exposition against what was served.
            if len(age._buckets) != len(self._bounds):
                raise RuntimeError("prometheus_client's Histogram layout is not the expected one")
            self._ages_to.append((age._buckets, age._sum))
            metrics.FRESHNESS_WINDOW.labels(codec.name).set(codec.spec.freshness_s)

    def flush(self) -> None:
        """Add what was logged to the Prometheus children and empty the log."""
        if not self.slots:
            return
        slots = np.array(self.slots, dtype=np.int64)
        ages = np.array(self.ages, dtype=np.float64)
        self.slots.clear()
        self.ages.clear()
        n_groups = len(self._codecs)
        counts = np.bincount(slots)
        for slot in np.flatnonzero(counts).tolist():
            n = int(counts[slot])
            group, read_slot = slot % n_groups, slot // n_groups
            read = self._codecs[group].reads[read_slot >> 1][read_slot & 1]
            self._served_to[group][read.source].inc(n)
            if read.reason is not None and read.defaulted:
                self._group_defaults_to[group][read.reason].inc(n)
                for feature in read.defaulted:
                    self._defaults_to[group][feature, read.reason].inc(n)
            if read.stale:
                self._stale_to[group][read.source].inc(n)
        groups = slots % n_groups
        known = ~np.isnan(ages)
        for group, (buckets, total) in enumerate(self._ages_to):
            # An event time ahead of this clock (the writer's clock is ahead) counts as 0.
            mine = np.maximum(ages[known & (groups == group)], 0.0)
            if not len(mine):
                continue
            # side="left": the first bound >= the age, Prometheus's `le`.
            per_bucket = np.bincount(
                np.searchsorted(self._bounds, mine, side="left"), minlength=len(buckets)
            )
            for i in np.flatnonzero(per_bucket).tolist():
                buckets[i].inc(int(per_bucket[i]))
            total.inc(float(mine.sum()))
