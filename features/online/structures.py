"""Codecs of the groups that are not hashes: an embedding string and two sorted-set reads.

- Embedding: GET of packed little-endian float32, one per dimension, decoded in one
  numpy call after a length check; a value of the wrong length, or with a NaN or an
  infinity, gets the defaults (reason invalid) and a corrupt-value count.
- Recent count: ZCARD, then ZCOUNT over the `window_s` seconds before the read (the
  worker's wall clock). An absent key (ZCARD 0: no history) is missing; a present one
  answers its count, 0 included.
- Member score: ZCARD, then ZSCORE of the request's member (e.g. the merchant in the
  user's set of merchants paid). An absent key is missing; a present key without the
  member answers 0.0, "none in the set's retention", a value like any other.

ZCARD tells "no history" (missing: counted as defaults) from "history without it" (a
value), which the reads alone cannot: Redis answers 0 and nil for an absent key too.
A sorted set holds times, never an event time of the group: never stale.
"""

from __future__ import annotations

import math
import struct
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from features import metrics
from features.online.entry import NO_EVENT_TS, Entry, GroupRead, Reason, Source
from features.online.keys import Key
from features.online.reads import Codec
from features.online.tier import Answer
from features.spec import FeatureGroup

_ONE = struct.Struct("=d")


def _frozen_one(value: float) -> npt.NDArray[np.float64]:
    """A read-only float64 array of one value, over immutable bytes."""
    return np.frombuffer(_ONE.pack(value), dtype=np.float64)


class _SetCodec(Codec):
    """A sorted set: ZCARD and one read per key, so absence is told apart."""

    n_replies = 2

    def __init__(self, group: FeatureGroup) -> None:
        super().__init__(group)
        self._invalid = {
            source: self.intern(GroupRead(source, group.field_names, Reason.INVALID))
            for source in (Source.REDIS, Source.BACKING)
        }
        self._feature = group.field_names[0]
        self._default = float(group.features[0].default)

    def answer(self, replies: Sequence[Any], now: float) -> list[Answer]:
        answers: list[Answer] = []
        for card, value in replies:
            if isinstance(card, Exception) or isinstance(value, Exception):
                answers.append(self.wrongtype)  # not a sorted set
            elif not card:
                answers.append(Reason.MISSING)  # no history (no backing store has it)
            else:
                answers.append(self._entry(value, Source.REDIS))
        return answers

    def decode_values(
        self, reply: Sequence[bytes | None], event_ts: float | None, now: float, source: Source
    ) -> Entry:
        return self._entry(reply[0], source)

    def _entry(self, raw: Any, source: Source) -> Entry:
        value = self._value(raw)
        if value is None:
            metrics.CORRUPT_VALUES.labels(self.name, self._feature).inc()
            return self.spec.defaults, self._invalid[source], NO_EVENT_TS
        # No event time: a sorted set carries its own times, never reported stale.
        return _frozen_one(value), self.clean[source, False], NO_EVENT_TS

    @abstractmethod
    def _value(self, raw: Any) -> float | None:
        """The feature's value from a reply, None if it is not one."""


class RecentCountCodec(_SetCodec):
    """ZCOUNT over the last `window_s` seconds of an event log scored by event time."""

    tracked = False  # events leave the window without a write: no invalidation says so

    def commands(self, key: Key, now: float) -> Sequence[tuple[Any, ...]]:
        return (("ZCARD", key.id), ("ZCOUNT", key.id, self._since(now), "+inf"))

    def pack(self, key: Key, now: float) -> bytes:
        """`commands` in RESP, formatted in one step (a third of hiredis' two packs)."""
        raw, since = key.id.encode(), self._since(now).encode()
        return (
            b"*2\r\n$5\r\nZCARD\r\n$%d\r\n%b\r\n"
            b"*4\r\n$6\r\nZCOUNT\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$4\r\n+inf\r\n"
            % (len(raw), raw, len(raw), raw, len(since), since)
        )

    def _since(self, now: float) -> str:
        return f"({now - self.spec.window_s!r}"  # exclusive: later than now - window

    def _value(self, raw: Any) -> float | None:
        return float(raw) if isinstance(raw, int) and raw >= 0 else None


class MemberScoreCodec(_SetCodec):
    """ZSCORE of the request's member: e.g. when this user last paid this merchant."""

    def commands(self, key: Key, now: float) -> Sequence[tuple[Any, ...]]:
        redis_key = self.spec.key(key.entity_id)
        return (("ZCARD", redis_key), ("ZSCORE", redis_key, key.member))

    def pack(self, key: Key, now: float) -> bytes:
        """`commands` in RESP, formatted in one step (a third of hiredis' two packs)."""
        raw, member = self.spec.key(key.entity_id).encode(), key.member.encode()
        return (
            b"*2\r\n$5\r\nZCARD\r\n$%d\r\n%b\r\n"
            b"*3\r\n$6\r\nZSCORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
            % (len(raw), raw, len(raw), raw, len(member), member)
        )

    def _value(self, raw: Any) -> float | None:
        if raw is None:
            return self._default  # the set holds no score for it: none within retention
        try:
            score = float(raw)  # bytes on the multiplexed path, float from redis-py
        except (TypeError, ValueError):
            return None
        return score if math.isfinite(score) and score >= 0.0 else None


class EmbeddingCodec(Codec):
    """GET of a packed little-endian float32 vector of the group's dimension."""

    def __init__(self, group: FeatureGroup) -> None:
        super().__init__(group)
        self.size = 4 * group.dim
        self._invalid = {
            source: self.intern(GroupRead(source, group.field_names, Reason.INVALID))
            for source in (Source.REDIS, Source.BACKING)
        }

    def pack(self, key: Key, now: float) -> bytes:
        raw = key.id.encode()
        return b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(raw), raw)

    def commands(self, key: Key, now: float) -> Sequence[tuple[Any, ...]]:
        return (("GET", key.id),)

    def answer(self, replies: Sequence[Any], now: float) -> list[Answer]:
        answers: list[Answer] = []
        for reply in replies:
            if reply is None:
                answers.append(Reason.MISSING)  # the backing store may have it
            elif isinstance(reply, Exception):
                answers.append(self.wrongtype)  # not a string
            else:
                answers.append(self.decode(reply, Source.REDIS))
        return answers

    def decode_values(
        self, reply: Sequence[bytes | None], event_ts: float | None, now: float, source: Source
    ) -> Entry:
        raw = reply[0]
        return self.missing if raw is None else self.decode(raw, source)

    def decode(self, raw: bytes, source: Source) -> Entry:
        """The vector in `raw`, or the defaults (invalid, counted) if it is not one."""
        if len(raw) == self.size:
            vector = np.frombuffer(raw, dtype="<f4")
            if np.isfinite(vector).all():
                values = vector.astype(np.float64)
                values.flags.writeable = False
                return values, self.clean[source, False], NO_EVENT_TS
        # One value holds every dimension: counted once, under the group's name.
        metrics.CORRUPT_VALUES.labels(self.name, self.spec.name).inc()
        return self.spec.defaults, self._invalid[source], NO_EVENT_TS


def pack_embedding(values: Sequence[float] | npt.NDArray[np.floating[Any]]) -> bytes:
    """An embedding as stored: little-endian float32, 4 bytes a dimension."""
    return np.asarray(values, dtype="<f4").tobytes()
