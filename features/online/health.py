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
from features.online.entry import GroupRead, Reason, Source

_SOURCES = {source: i for i, source in enumerate(Source)}
_REASONS = {reason: i for i, reason in enumerate(Reason)}


class GroupHealth:
    """One group's tallies since the last flush, and the children they are written to.

    `count` runs on the request path: a few list increments, one bisect for the age bucket,
    and per defaulted feature one more increment. The slots a GroupRead's defaults go to
    are computed once per interned read (the codec's read ids), not per request.
    """

    __slots__ = (
        "_age_buckets_to",
        "_age_sum_to",
        "_ages",
        "_bounds",
        "_codec",
        "_default_slots",
        "_defaulted",
        "_defaults",
        "_defaults_to",
        "_features",
        "_served",
        "_served_to",
        "_sum_s",
    )

    def __init__(self, codec: GroupCodec) -> None:
        name = codec.name
        names = codec.spec.field_names
        self._codec = codec
        self._features = {feature: i for i, feature in enumerate(names)}
        # Bound once: every series exists from the start, so rates read 0, not absent.
        self._served_to = [metrics.SERVED.labels(name, source) for source in Source]
        self._defaults_to = [
            metrics.FEATURE_DEFAULTS.labels(name, feature, reason)
            for reason in Reason
            for feature in names
        ]
        age = metrics.SERVED_AGE.labels(name)
        # prometheus_client has no call that adds n observations to a bucket: its per-bucket
        # values (not cumulative) and sum are written directly; tests/test_health.py checks
        # the exposition against what was served.
        self._age_buckets_to = age._buckets
        self._age_sum_to = age._sum
        self._bounds = (*metrics.AGE_BUCKETS_S, math.inf)
        if len(self._age_buckets_to) != len(self._bounds):
            raise RuntimeError("prometheus_client's Histogram layout is not the one expected")
        metrics.FRESHNESS_WINDOW.labels(name).set(codec.spec.freshness_s)
        self._served = [0] * len(self._served_to)
        self._defaults = [0] * len(self._defaults_to)
        self._ages = [0] * len(self._bounds)
        self._default_slots: list[tuple[int, ...] | None] = []  # by read id
        self._defaulted = False  # any default tallied since the last flush
        self._sum_s = 0.0

    def count(self, read: GroupRead, read_id: int, event_ts: float, now: float) -> None:
        """One row's group served: `read` as it went out, `read_id` its index in the codec,
        `event_ts` its event time (NaN if none) and `now` the wall clock at serving."""
        self._served[_SOURCES[read.source]] += 1
        reason = read.reason
        if read.defaulted and reason is not None:
            defaults = self._defaults
            for slot in self._slots(reason, read.defaulted, read_id):
                defaults[slot] += 1
            self._defaulted = True
        age = now - event_ts
        if age == age:  # not NaN: it has an event time
            if age < 0.0:
                age = 0.0  # written with a clock ahead of this one
            self._ages[bisect_left(self._bounds, age)] += 1
            self._sum_s += age

    def flush(self) -> None:
        """Add the tallies to their Prometheus children and start them again from zero."""
        pairs = [(self._served, self._served_to), (self._ages, self._age_buckets_to)]
        if self._defaulted:  # most intervals have none: skip the feature x reason slots
            self._defaulted = False
            pairs.append((self._defaults, self._defaults_to))
        for tallies, children in pairs:
            for i, n in enumerate(tallies):
                if n:
                    tallies[i] = 0
                    children[i].inc(n)
        if self._sum_s:
            sum_s, self._sum_s = self._sum_s, 0.0
            self._age_sum_to.inc(sum_s)

    def _slots(self, reason: Reason, defaulted: tuple[str, ...], read_id: int) -> tuple[int, ...]:
        """The default tallies of read `read_id`: one per defaulted feature, for its reason."""
        known = self._default_slots
        if read_id >= len(known):
            known.extend([None] * (len(self._codec.reads) - len(known)))
        slots = known[read_id]
        if slots is None:
            base = _REASONS[reason] * len(self._features)
            slots = known[read_id] = tuple(base + self._features[f] for f in defaulted)
        return slots
