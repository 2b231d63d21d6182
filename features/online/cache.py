"""The in-process tier: recent entries by key, LRU-bounded, fresh for a TTL (a longer one
while Redis tracks what this worker read and says when it changes)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from features.online.entry import Entry

Cached = tuple[npt.NDArray[np.float64], int, float, float, int, str]
"""An Entry (values, read index, event time), the timer reading when it was stored, the
tracking session it was read under, and for a member's entry the Redis key it is a member
of ("" for others); plain tuples, untracked by the GC."""

UNTRACKED = 0
"""The session of an entry read while no invalidation session was live."""

NO_SESSION = -1
"""`EntryCache.session` while no session is live: no entry carries it."""


class EntryCache:
    """Entries served fresh for `ttl_s`, or for `tracked_ttl_s` if read under the live
    invalidation session; kept up to `keep_s` as the last value read, for the deadline's
    fallback; at most `maxsize` of them, least recently used out first.

    Sessions (features/online/tracking.py): while Redis tracks the keys this worker reads
    and pushes an invalidation when one changes, `session` is that session's number and
    entries read under it stay fresh for the longer TTL. When the session ends every entry
    loses the longer TTL at once, in O(1): `session` moves on and no entry matches it. An
    invalidated key is dropped (`drop`), with every member entry of it (a member-score
    group caches each (key, member) pair under its own id: the cache indexes them by
    their Redis key); a flushed server empties the cache (`clear`).

    One event loop owns it, so it needs no lock. Times come from the caller (`now`, one
    timer reading per request), not from a clock read per key. The LRU order is an
    OrderedDict's (C calls only: cachetools' LRUCache spent ~1 us of Python per lookup).
    """

    def __init__(
        self, maxsize: int, ttl_s: float, keep_s: float, tracked_ttl_s: float | None = None
    ) -> None:
        tracked_ttl_s = ttl_s if tracked_ttl_s is None else tracked_ttl_s
        if maxsize < 1 or ttl_s <= 0 or tracked_ttl_s < ttl_s or keep_s < tracked_ttl_s:
            raise ValueError("need maxsize >= 1, ttl_s > 0 and ttl_s <= tracked_ttl_s <= keep_s")
        self._entries: OrderedDict[str, Cached] = OrderedDict()
        self._members: dict[str, set[str]] = {}  # Redis key -> ids of its member entries
        self._maxsize = maxsize
        self.ttl_s = ttl_s
        self.tracked_ttl_s = tracked_ttl_s
        self.keep_s = keep_s
        self.session = NO_SESSION  # set by the invalidation session, if any

    def fresh(self, key_id: str, now: float) -> Cached | None:
        """The entry under `key_id` stored less than `ttl_s` ago, or less than
        `tracked_ttl_s` ago under the live session; else None."""
        cached = self._touch(key_id)
        if cached is None:
            return None
        age = now - cached[3]
        if age < self.ttl_s or (age < self.tracked_ttl_s and cached[4] == self.session):
            return cached
        return None

    def last(self, key_id: str, now: float) -> Cached | None:
        """The entry stored under `key_id` less than `keep_s` ago, fresh or not."""
        cached = self._touch(key_id)
        return cached if cached is not None and now - cached[3] < self.keep_s else None

    def put(
        self, key_id: str, entry: Entry, now: float, session: int = UNTRACKED, member_of: str = ""
    ) -> None:
        """Store `entry` as read at `now` under `session` (the session live when its read
        was sent); `member_of` is the Redis key of a member's entry."""
        entries = self._entries
        entries[key_id] = (entry[0], entry[1], entry[2], now, session, member_of)
        entries.move_to_end(key_id)
        if member_of:
            members = self._members.get(member_of)
            if members is None:
                members = self._members[member_of] = set()
            members.add(key_id)
        if len(entries) > self._maxsize:
            old_id, old = entries.popitem(last=False)
            if old[5]:
                self._forget_member(old[5], old_id)

    def drop(self, redis_key: str) -> int:
        """Forget the entry of `redis_key` and every member entry of it; how many were held."""
        entries = self._entries
        dropped = entries.pop(redis_key, None) is not None
        members = self._members.pop(redis_key, None)
        if members is None:
            return int(dropped)
        for key_id in members:
            entries.pop(key_id, None)
        return int(dropped) + len(members)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._members.clear()

    def _forget_member(self, redis_key: str, key_id: str) -> None:
        members = self._members.get(redis_key)
        if members is not None:
            members.discard(key_id)
            if not members:
                del self._members[redis_key]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._entries

    def _touch(self, key_id: str) -> Cached | None:
        """The entry under `key_id`, now the most recently used; None if absent."""
        cached = self._entries.get(key_id)
        if cached is not None:
            self._entries.move_to_end(key_id)
        return cached
