"""What a read returns: per group its source, reason and staleness; per request the rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt


class Source(StrEnum):
    """Where a group's values came from."""

    CACHE = "cache"  # this worker's memory: fresh, or (reason deadline) the last value read
    REDIS = "redis"
    BACKING = "backing"  # the persistent store, for keys Redis missed or failed
    DEFAULT = "default"


class Reason(StrEnum):
    """Why a group's values are not all fresh from a store: some or all are defaults,
    or (deadline, from the cache) the last value this worker read."""

    MISSING = "missing"  # no such key: unknown entity, or expired
    INVALID = "invalid"  # fields absent, unparsable, or the key is not a hash
    UNAVAILABLE = "unavailable"  # Redis (and the backing store, if any) failed or timed out
    CIRCUIT_OPEN = "circuit_open"  # Redis was not asked: it failed or was slow recently
    DEADLINE = "deadline"  # no store answered within the feature step's deadline


NOT_CACHED = frozenset({Reason.UNAVAILABLE, Reason.CIRCUIT_OPEN, Reason.DEADLINE})
"""Reasons that say something about the stores, not the entity: never cached."""


@dataclass(frozen=True, slots=True)
class GroupRead:
    """One group of one row: its source, which features fell back to defaults, why, and
    whether its event time is older than the group's freshness window."""

    source: Source
    defaulted: tuple[str, ...] = ()
    reason: Reason | None = None
    stale: bool = False


NO_EVENT_TS = math.nan
"""The event time of an Entry that has none (defaults; a value stored without one)."""

Entry = tuple[npt.NDArray[np.float64], int, float]
"""One group of one entity as a tier answers it: its values (read-only), the index of its
GroupRead pair in the group's codec, and its event time (unix s; NaN when unknown, as for
defaults), from which the store observes the age of what it serves. A plain tuple of
untracked objects, short-lived: the cache keeps its parts, not the tuple
(features/online/cache.py)."""


@dataclass(frozen=True, slots=True)
class FeatureRows:
    """Stored values (float64: timestamps need it), columns in STORED_FEATURES order."""

    values: npt.NDArray[np.float64]
    reads: list[dict[str, GroupRead]]
    source: Source
    """The slowest source any row needed: the request's latency class."""
