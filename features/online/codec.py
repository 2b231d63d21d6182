"""Hashes: the HMGET that reads one, and its stored strings decoded into checked values.

`codec_for` gives any group its codec: this one for hashes, structures.py's for the rest.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from features import metrics
from features.online.entry import NO_EVENT_TS, Entry, GroupRead, Reason, Source
from features.online.keys import Key
from features.online.multiplex import hmget_packer
from features.online.reads import Codec
from features.online.structures import EmbeddingCodec, MemberScoreCodec, RecentCountCodec
from features.online.tier import Answer
from features.spec import EVENT_TS_FIELD, Dtype, FeatureGroup, Kind

# The smallest magnitude that becomes inf as float32 (FLT_MAX plus half an ulp):
# values must stay finite as float32, because the model reads float32.
_FLOAT32_OVERFLOW = 3.4028235677973366e38
_ZERO_ONE = frozenset((0.0, 1.0))
# From this many replies of one group, decode_found parses them as one array: fewer
# cost more in numpy calls than they save.
_BATCH_MIN = 8


class GroupCodec(Codec):
    """One hash per entity: HMGET of its fields and event time."""

    def __init__(self, group: FeatureGroup) -> None:
        super().__init__(group)
        self.fields = (*group.field_names, EVENT_TS_FIELD)  # what one HMGET asks for
        self._hmget = hmget_packer(self.fields)
        # Per field: (must be a whole number, must be 0 or 1, default).
        self.checks = tuple(
            (f.dtype != Dtype.FLOAT, f.dtype == Dtype.BOOL, float(f.default))
            for f in group.features
        )
        whole = [i for i, f in enumerate(group.features) if f.dtype != Dtype.FLOAT]
        flags = [i for i, f in enumerate(group.features) if f.dtype == Dtype.BOOL]
        self.whole, self.flags = _picker(whole), _picker(flags)
        self._whole_columns, self._flag_columns = np.array(whole), np.array(flags)
        self._pack = struct.Struct(f"={len(group.features)}d").pack
        # Bound once, so a series exists per field from the start and a count costs no
        # .labels() call.
        self._corrupt = tuple(
            metrics.CORRUPT_VALUES.labels(self.name, n) for n in group.field_names
        )

    def pack(self, key: Key, now: float) -> bytes:
        return self._hmget(key.id)

    def commands(self, key: Key, now: float) -> Sequence[tuple[Any, ...]]:
        return (("HMGET", key.id, *self.fields),)

    def answer(self, replies: Sequence[Any], now: float) -> list[Answer]:
        """Found replies are decoded all at once; a wrong-type key gets the defaults."""
        if len(replies) == 1:  # one row's read, the common case: nothing to gather
            reply = replies[0]
            if isinstance(reply, Exception):
                return [self.wrongtype]
            if reply.count(None) == len(reply):
                return [Reason.MISSING]
            return [self.decode_values(reply[:-1], _event_ts(reply[-1]), now, Source.REDIS)]
        answers: list[Answer] = [Reason.MISSING] * len(replies)  # the backing store may have it
        found: list[int] = []
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                answers[i] = self.wrongtype
            elif reply.count(None) != len(reply):
                found.append(i)
        if found:
            decoded = self.decode_found([replies[i] for i in found], now)
            for i, entry in zip(found, decoded, strict=True):
                answers[i] = entry
        return answers

    def decode(self, reply: list[bytes | None], now: float) -> Entry:
        """Turn one HMGET reply (fields, then event time) into values; bad or absent
        fields get their defaults."""
        if reply.count(None) == len(reply):
            return self.missing
        return self.decode_values(reply[:-1], _event_ts(reply[-1]), now, Source.REDIS)

    def decode_found(self, replies: Sequence[list[bytes | None]], now: float) -> list[Entry]:
        """`decode` of HMGET replies holding at least one field each, all at once: one
        numpy parse (bytes to float as float() parses them; None as NaN) and checks per
        column. A reply that fails a check, or a batch numpy cannot parse, is decoded on
        its own (`decode_values`), so every entry is what `decode` gives."""
        if len(replies) < _BATCH_MIN:
            return [
                self.decode_values(r[:-1], _event_ts(r[-1]), now, Source.REDIS) for r in replies
            ]
        try:
            table = np.array(replies, dtype=np.float64)
        except ValueError:  # an unparsable field somewhere: each on its own
            return [
                self.decode_values(r[:-1], _event_ts(r[-1]), now, Source.REDIS) for r in replies
            ]
        values, event_ts = table[:, :-1], table[:, -1]
        ok = np.asarray((np.abs(values) < _FLOAT32_OVERFLOW).all(axis=1))  # NaN (absent): False
        if len(self._whole_columns):
            whole = values[:, self._whole_columns]
            ok &= (np.floor(whole) == whole).all(axis=1)
        if len(self._flag_columns):
            flags = values[:, self._flag_columns]
            ok &= ((flags == 0.0) | (flags == 1.0)).all(axis=1)
        known = np.isfinite(event_ts)
        with np.errstate(invalid="ignore"):  # inf - inf: not finite, so never stale
            stale = known & (now - event_ts > self.spec.freshness_s)
        times = np.where(known, event_ts, NO_EVENT_TS).tolist()
        clean = self.clean
        entries: list[Entry] = []
        for i, (valid, old, ts) in enumerate(zip(ok.tolist(), stale.tolist(), times, strict=True)):
            if valid:
                # Its own (immutable) buffer: a cached row keeps no batch alive.
                row = np.frombuffer(values[i].tobytes(), dtype=np.float64)
                entries.append((row, clean[Source.REDIS, old], ts))
            else:
                reply = replies[i]
                entries.append(
                    self.decode_values(reply[:-1], _event_ts(reply[-1]), now, Source.REDIS)
                )
        return entries

    def all_valid(self, values: list[float]) -> bool:
        """Every value passes its checks, tested in aggregate (C loops, no Python loop).

        False can still mean valid (a finite sum that overflows): decode_values() then
        checks each value on its own.
        """
        total = sum(values)
        return (
            total - total == 0.0  # NaN or inf anywhere makes this NaN
            and min(values) > -_FLOAT32_OVERFLOW
            and max(values) < _FLOAT32_OVERFLOW
            and all(map(float.is_integer, self.whole(values)))
            and set(self.flags(values)) <= _ZERO_ONE
        )

    def decode_values(
        self, reply: Sequence[bytes | None], event_ts: float | None, now: float, source: Source
    ) -> Entry:
        """Values of one group from raw strings in field order."""
        if event_ts is None or not math.isfinite(event_ts):
            event_ts = NO_EVENT_TS  # never stale
        stale = now - event_ts > self.spec.freshness_s  # False for NaN
        # Plain floats: for ten fields, several times cheaper than numpy.
        values = _floats(reply)
        if self.all_valid(values):
            return self._frozen(values), self.clean[source, stale], event_ts
        spec = self.spec
        bad: list[int] = []
        for i, (value, (integral, boolean, default)) in enumerate(
            zip(values, self.checks, strict=True)
        ):
            if (
                -_FLOAT32_OVERFLOW < value < _FLOAT32_OVERFLOW  # also False for NaN
                and (not integral or value.is_integer())
                and (not boolean or value in (0.0, 1.0))
            ):
                continue
            bad.append(i)
            values[i] = default
            if reply[i] is not None:
                self._corrupt[i].inc()
        if not bad:
            return self._frozen(values), self.clean[source, stale], event_ts
        defaulted = tuple(spec.field_names[i] for i in bad)
        read_id = self.intern(GroupRead(source, defaulted, Reason.INVALID, stale))
        return self._frozen(values), read_id, event_ts

    def _frozen(self, values: list[float]) -> npt.NDArray[np.float64]:
        """A read-only float64 array of `values`: over packed bytes, which are immutable,
        so it needs no flag set (a third of the cost of np.array and a flag)."""
        return np.frombuffer(self._pack(*values), dtype=np.float64)


_CODECS: dict[Kind, Callable[[FeatureGroup], Codec]] = {
    Kind.HASH: GroupCodec,
    Kind.EMBEDDING: EmbeddingCodec,
    Kind.RECENT_COUNT: RecentCountCodec,
    Kind.MEMBER_SCORE: MemberScoreCodec,
}


@functools.cache
def codec_for(group: FeatureGroup) -> Codec:
    """The one codec of `group` in this process. Entries carry indices into its tables,
    so the store and every tier must use the same instance: build yours with this."""
    return _CODECS[group.kind](group)


def _picker(indices: list[int]) -> Callable[[list[float]], Sequence[float]]:
    """`values -> the values at indices`, as one C call (itemgetter)."""
    if not indices:
        return lambda values: ()
    if len(indices) == 1:
        (only,) = indices
        return lambda values: (values[only],)
    return operator.itemgetter(*indices)


def _floats(reply: Sequence[bytes | None]) -> list[float]:
    try:
        return list(map(float, reply))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return [_to_float(raw) for raw in reply]


def _event_ts(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        ts = float(raw)
    except ValueError:
        return None
    return ts if math.isfinite(ts) else None


def _to_float(raw: bytes | None) -> float:
    try:
        return float(raw) if raw is not None else float("nan")
    except ValueError:
        return float("nan")
