"""The in-process tier: recent entries by key, LRU-bounded, fresh for a TTL (a longer one
while Redis tracks what this worker read and says when it changes)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from features.online.entry import Entry

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

    No entry is a container the collector tracks: each of its parts (values, read index,
    event time, store time, session) sits in a map of its own, and the maps of strings,
    numbers and arrays stay untracked. A stored tuple would be tracked until the next
    young pass: on a cold cache nearly every request stores a few, so they were what set
    the young collections off (~7 survivors a request) and what each pass walked.

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
        self._values: OrderedDict[str, npt.NDArray[np.float64]] = OrderedDict()  # LRU order
        self._reads: dict[str, int] = {}
        self._event_ts: dict[str, float] = {}
        self._stored: dict[str, float] = {}  # the timer reading when it was stored
        self._sessions: dict[str, int] = {}  # the tracking session it was read under
        self._member_of: dict[str, str] = {}  # a member's entry: the Redis key it is of
        # Redis key -> ids of its member entries (dicts of None: sets are always tracked).
        self._members: dict[str, dict[str, None]] = {}
        self._maxsize = maxsize
        self.ttl_s = ttl_s
        self.tracked_ttl_s = tracked_ttl_s
        self.keep_s = keep_s
        self.session = NO_SESSION  # set by the invalidation session, if any

    def fresh(self, key_id: str, now: float) -> Entry | None:
        """The entry under `key_id` stored less than `ttl_s` ago, or less than
        `tracked_ttl_s` ago under the live session; else None."""
        values = self._values.get(key_id)
        if values is None:
            return None
        self._values.move_to_end(key_id)
        age = now - self._stored[key_id]
        if age < self.ttl_s or (
            age < self.tracked_ttl_s and self._sessions[key_id] == self.session
        ):
            return values, self._reads[key_id], self._event_ts[key_id]
        return None

    def last(self, key_id: str, now: float) -> Entry | None:
        """The entry stored under `key_id` less than `keep_s` ago, fresh or not."""
        values = self._values.get(key_id)
        if values is None:
            return None
        self._values.move_to_end(key_id)
        if now - self._stored[key_id] < self.keep_s:
            return values, self._reads[key_id], self._event_ts[key_id]
        return None

    def put(
        self, key_id: str, entry: Entry, now: float, session: int = UNTRACKED, member_of: str = ""
    ) -> None:
        """Store `entry` as read at `now` under `session` (the session live when its read
        was sent); `member_of` is the Redis key of a member's entry."""
        values = self._values
        values[key_id] = entry[0]
        values.move_to_end(key_id)
        self._reads[key_id] = entry[1]
        self._event_ts[key_id] = entry[2]
        self._stored[key_id] = now
        self._sessions[key_id] = session
        if member_of:
            self._member_of[key_id] = member_of
            members = self._members.get(member_of)
            if members is None:
                members = self._members[member_of] = {}
            members[key_id] = None
        if len(values) > self._maxsize:
            old_id, _ = values.popitem(last=False)
            self._forget(old_id)

    def drop(self, redis_key: str) -> int:
        """Forget the entry of `redis_key` and every member entry of it; how many were held."""
        dropped = self._pop(redis_key)
        members = self._members.pop(redis_key, None)
        if members is None:
            return int(dropped)
        for key_id in members:
            self._pop(key_id)
        return int(dropped) + len(members)

    def clear(self) -> None:
        """Forget every entry."""
        for part in (self._values, self._reads, self._event_ts, self._stored, self._sessions):
            part.clear()
        self._member_of.clear()
        self._members.clear()

    def _pop(self, key_id: str) -> bool:
        """Forget one entry; False if it was not held."""
        if self._values.pop(key_id, None) is None:
            return False
        self._forget(key_id)
        return True

    def _forget(self, key_id: str) -> None:
        """Forget the parts of an entry whose values are gone, and its place in its Redis
        key's member index (if `drop` has not taken that index away whole)."""
        del self._reads[key_id], self._event_ts[key_id], self._stored[key_id]
        del self._sessions[key_id]
        member_of = self._member_of.pop(key_id, "")
        members = self._members.get(member_of) if member_of else None
        if members is not None:
            members.pop(key_id, None)
            if not members:
                del self._members[member_of]

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._values
