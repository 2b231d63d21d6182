"""Feature health: what the store served per group, by source, which features went out as
defaults and why, and how old the served values were.

Tallied per served group in plain Python (list slots, no Prometheus call) and written to the
Prometheus children at most once per interval by `flush`: a Prometheus call costs ~0.5 us
in process and ~1-2.5 us in multiprocess mode (a locked write to its mmapped file), and
these would be several calls for every group of every request.
"""

from __future__ import annotations

import math
from bisect import bisect_left

from features import metrics
from features.online.codec import GroupCodec
from features.online.entry import Reason, Source


class GroupHealth:
    """One group's tallies since the last flush, and the children they are written to.

    `count` runs on the request path: one count per served read, by its slot (`2 * read_id`
    as read, `2 * read_id + 1` as served from the cache: `codec.reads[read_id]`'s pair,
    flattened), and for a value with an event time one bisect for its age bucket. What a
    read means (its source, its defaulted features and reason) is worked out in `flush`,
    once per read and interval.
    """

    __slots__ = (
        "_age_buckets_to",
        "_age_sum_to",
        "_ages",
        "_bounds",
        "_codec",
        "_defaults_to",
        "_reads",
        "_served_to",
        "_sum_s",
    )

    def __init__(self, codec: GroupCodec) -> None:
        name = codec.name
        self._codec = codec
        # Bound once: every series exists from the start, so rates read 0, not absent.
        self._served_to = {source: metrics.SERVED.labels(name, source) for source in Source}
        self._defaults_to = {
            (feature, reason): metrics.FEATURE_DEFAULTS.labels(name, feature, reason)
            for reason in Reason
            for feature in codec.spec.field_names
        }
        age = metrics.SERVED_AGE.labels(name)
        # prometheus_client has no call that adds n observations at once: the histogram's
        # per-bucket values (not cumulative) and its sum are written directly.
        # tests/test_health.py checks the exposition against what was served.
        self._age_buckets_to = age._buckets
        self._age_sum_to = age._sum
        # Floats: bisect compares float ages with them, which mixed with ints is slower.
        self._bounds = (*map(float, metrics.AGE_BUCKETS_S), math.inf)
        if len(self._age_buckets_to) != len(self._bounds):
            raise RuntimeError("prometheus_client's Histogram layout is not the one expected")
        metrics.FRESHNESS_WINDOW.labels(name).set(codec.spec.freshness_s)
        self._reads = [0] * (2 * len(codec.reads))  # by slot; grows with the codec's reads
        self._ages = [0] * len(self._bounds)
        self._sum_s = 0.0

    def count(self, read_slot: int, event_ts: float, now: float) -> None:
        """One row's group served: its read's slot, its event time (NaN if none) and the
        wall clock when served."""
        try:
            self._reads[read_slot] += 1
        except IndexError:  # a read interned since: grow to the codec's reads
            self._reads.extend([0] * (2 * len(self._codec.reads) - len(self._reads)))
            self._reads[read_slot] += 1
        age = now - event_ts
        if age == age:  # not NaN: it has an event time
            if age < 0.0:
                age = 0.0  # written with a clock ahead of this one
            self._ages[bisect_left(self._bounds, age)] += 1
            self._sum_s += age

    def flush(self) -> None:
        """Add the tallies to their Prometheus children and start them again from zero."""
        reads = self._reads
        pairs = self._codec.reads
        for i, n in enumerate(reads):
            if not n:
                continue
            reads[i] = 0
            read = pairs[i >> 1][i & 1]
            self._served_to[read.source].inc(n)
            if read.reason is not None:
                for feature in read.defaulted:
                    self._defaults_to[feature, read.reason].inc(n)
        ages = self._ages
        for i, n in enumerate(ages):
            if n:
                ages[i] = 0
                self._age_buckets_to[i].inc(n)
        if self._sum_s:
            sum_s, self._sum_s = self._sum_s, 0.0
            self._age_sum_to.inc(sum_s)
