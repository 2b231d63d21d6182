"""The in-process tier: recent entries by key, LRU-bounded, fresh for a TTL."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from features.online.entry import Entry

Cached = tuple[npt.NDArray[np.float64], int, float, float]
"""An Entry and the timer reading when it was stored; plain tuples, untracked by the GC."""


class EntryCache:
    """Entries served fresh for `ttl_s`; kept up to `keep_s` as the last value read, for
    the deadline's fallback; at most `maxsize` of them, least recently used out first.

    One event loop owns it, so it needs no lock. Times come from the caller (`now`, one
    timer reading per request), not from a clock read per key. The LRU order is an
    OrderedDict's (C calls only: cachetools' LRUCache spent ~1 us of Python per lookup).
    """

    def __init__(self, maxsize: int, ttl_s: float, keep_s: float) -> None:
        if maxsize < 1 or ttl_s <= 0 or keep_s < ttl_s:
            raise ValueError("need maxsize >= 1, ttl_s > 0 and keep_s >= ttl_s")
        self._entries: OrderedDict[str, Cached] = OrderedDict()
        self._maxsize = maxsize
        self.ttl_s = ttl_s
        self.keep_s = keep_s

    def fresh(self, key_id: str, now: float) -> Cached | None:
        """The entry stored under `key_id` less than `ttl_s` ago, else None."""
        cached = self._touch(key_id)
        return cached if cached is not None and now - cached[3] < self.ttl_s else None

    def last(self, key_id: str, now: float) -> Cached | None:
        """The entry stored under `key_id` less than `keep_s` ago, fresh or not."""
        cached = self._touch(key_id)
        return cached if cached is not None and now - cached[3] < self.keep_s else None

    def put(self, key_id: str, entry: Entry, now: float) -> None:
        """Store `entry` as read at `now`."""
        entries = self._entries
        entries[key_id] = (entry[0], entry[1], entry[2], now)
        entries.move_to_end(key_id)
        if len(entries) > self._maxsize:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def _touch(self, key_id: str) -> Cached | None:
        """The entry under `key_id`, now the most recently used; None if absent."""
        cached = self._entries.get(key_id)
        if cached is not None:
            self._entries.move_to_end(key_id)
        return cached
