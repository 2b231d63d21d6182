"""What every group's codec shares: its interned GroupReads, its defaults per reason, and
the interface the tiers call (the commands that read a key, the decode of their replies).

Kinds of group (features/spec.py Kind) each have a codec: codec.py (hashes),
structures.py (embeddings and the sorted sets); `codec_for` in codec.py picks it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from features.online.entry import NO_EVENT_TS, Entry, GroupRead, Reason, Source
from features.online.keys import Key
from features.online.tier import Answer
from features.spec import FeatureGroup


class Codec(ABC):
    """Decoding state of one group, computed once per process (`codec_for`).

    GroupReads are interned: an Entry carries the index of its (as read, as served from
    the cache) pair in `reads`, so cached entries hold no tracked objects.
    """

    n_replies = 1
    """Replies one key's commands get: the Redis tier splits a pipeline's replies by it."""

    tracked = True
    """A value that changes only when its key is written, so an invalidation says when:
    cached for the tracked TTL under a live session. False for a value that also moves
    with time alone (a count over a sliding window): the short TTL always."""

    def __init__(self, group: FeatureGroup) -> None:
        self.spec = group
        self.name = group.qualified_name
        self.reads: list[tuple[GroupRead, GroupRead]] = []
        self._ids: dict[GroupRead, int] = {}
        # The reads of a clean decode, by (source, stale): looked up, not built, per read.
        self.clean = {
            (source, stale): self.intern(GroupRead(source, (), None, stale))
            for source in (Source.REDIS, Source.BACKING)
            for stale in (False, True)
        }
        names = group.field_names
        self.defaults = {
            reason: (
                group.defaults,
                self.intern(GroupRead(Source.DEFAULT, names, reason)),
                NO_EVENT_TS,
            )
            for reason in Reason
        }
        self.missing = self.defaults[Reason.MISSING]
        self.wrongtype = self.defaults[Reason.INVALID]

    def intern(self, read: GroupRead) -> int:
        """The index of `read` (and its as-cached twin) in `reads`."""
        index = self._ids.get(read)
        if index is None:
            cached = read
            if read.source in (Source.REDIS, Source.BACKING):
                cached = GroupRead(Source.CACHE, read.defaulted, read.reason, read.stale)
            index = self._ids[read] = len(self.reads)
            self.reads.append((read, cached))
        return index

    def on_deadline(self, values: npt.NDArray[np.float64], read_id: int, event_ts: float) -> Entry:
        """The last value read, served at the deadline: from the cache, stale, reason
        deadline, with its event time."""
        read = self.reads[read_id][0]
        stale = GroupRead(Source.CACHE, read.defaulted, Reason.DEADLINE, True)
        return values, self.intern(stale), event_ts

    @abstractmethod
    def pack(self, key: Key, now: float) -> bytes:
        """The commands reading `key` in RESP (the multiplexed path); `now` is wall time."""

    @abstractmethod
    def commands(self, key: Key, now: float) -> Sequence[tuple[Any, ...]]:
        """The same commands as argument tuples (redis-py's pipelines)."""

    @abstractmethod
    def answer(self, replies: Sequence[Any], now: float) -> list[Answer]:
        """Each key's entry, or MISSING to ask the next tier. One item per key: its reply,
        or the list of its replies when `n_replies` > 1; error replies are values."""

    @abstractmethod
    def decode_values(
        self, reply: Sequence[bytes | None], event_ts: float | None, now: float, source: Source
    ) -> Entry:
        """Values from the raw strings a backing store keeps, in field order."""
