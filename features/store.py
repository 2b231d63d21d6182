"""Feature rows for entities: in-process cache, then one Redis round trip, then defaults."""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from features import metrics
from features.errors import InvalidEntityId
from features.spec import ENTITY_ID_PATTERN, GROUPS, Dtype, FeatureGroup, validate_entity_id

logger = logging.getLogger(__name__)

# The smallest magnitude that becomes inf as float32 (FLT_MAX plus half an ulp):
# values must stay finite as float32, because the model reads float32.
_FLOAT32_OVERFLOW = 3.4028235677973366e38
_valid_id = re.compile(ENTITY_ID_PATTERN).fullmatch  # validate_entity_id's rule, inlined


class Source(StrEnum):
    """Where a group's values came from."""

    CACHE = "cache"
    REDIS = "redis"
    DEFAULT = "default"


class Reason(StrEnum):
    """Why some or all of a group's values are its defaults."""

    MISSING = "missing"  # no such key: unknown entity, or expired
    INVALID = "invalid"  # fields absent, unparsable, or the key is not a hash
    UNAVAILABLE = "unavailable"  # Redis failed or timed out


@dataclass(frozen=True, slots=True)
class GroupRead:
    """One group of one row: its source, and which features fell back to defaults."""

    source: Source
    defaulted: tuple[str, ...] = ()
    reason: Reason | None = None


@dataclass(frozen=True, slots=True)
class FeatureRows:
    """Stored values (float64: timestamps need it), columns in STORED_FEATURES order."""

    values: npt.NDArray[np.float64]
    reads: list[dict[str, GroupRead]]
    source: Source
    """The slowest source any row needed: the request's latency class."""


class _Entry(NamedTuple):
    """A cached group; a tuple because a frozen dataclass costs ~1 us more to build."""

    values: npt.NDArray[np.float64]
    read: GroupRead  # as it came from Redis
    cached: GroupRead  # the same, served from the cache


class _Group:
    """Decoding state of one group, computed once."""

    def __init__(self, group: FeatureGroup) -> None:
        self.spec = group
        self.name = group.qualified_name
        self.entity = group.entity
        self.id_field = f"{group.entity}_id"
        # key(id) == prefix + id + suffix, without a call per key on the hot path.
        self.prefix, self.suffix = group.key("\0").split("\0")
        # Per field: (must be a whole number, must be 0 or 1, default).
        self.checks = tuple(
            (f.dtype != Dtype.FLOAT, f.dtype == Dtype.BOOL, float(f.default))
            for f in group.features
        )
        names = group.field_names
        self.missing = _entry(group.defaults, Source.DEFAULT, names, Reason.MISSING)
        self.unavailable = _entry(group.defaults, Source.DEFAULT, names, Reason.UNAVAILABLE)
        self.wrongtype = _entry(group.defaults, Source.DEFAULT, names, Reason.INVALID)
        self.fresh = GroupRead(Source.REDIS)
        self.cached = GroupRead(Source.CACHE)
        whole = [i for i, f in enumerate(group.features) if f.dtype != Dtype.FLOAT]
        flags = [i for i, f in enumerate(group.features) if f.dtype == Dtype.BOOL]
        self.whole, self.flags = _picker(whole), _picker(flags)
        self.integral = np.array([f.dtype != Dtype.FLOAT for f in group.features])
        self.boolean = np.array([f.dtype == Dtype.BOOL for f in group.features])

    def all_valid(self, values: list[float]) -> bool:
        """Every value passes its checks: aggregate tests in C, no loop in Python.

        False can still mean valid (a finite sum that overflows): decode() then checks
        each value on its own.
        """
        total = sum(values)
        return (
            total - total == 0.0  # NaN or inf anywhere makes this NaN
            and min(values) > -_FLOAT32_OVERFLOW
            and max(values) < _FLOAT32_OVERFLOW
            and all(map(float.is_integer, self.whole(values)))
            and set(self.flags(values)) <= _ZERO_ONE
        )

    def decode(self, reply: list[bytes | None]) -> _Entry:
        """Turn one HMGET reply into values; bad or absent fields get their defaults."""
        if reply.count(None) == len(reply):
            return self.missing
        # Plain floats: for ten fields, several times cheaper than numpy.
        values = _floats(reply)
        if self.all_valid(values):
            array = np.array(values, dtype=np.float64)
            array.flags.writeable = False
            return _Entry(array, self.fresh, self.cached)
        bad: list[int] = []
        floor = math.floor
        checks = zip(values, self.checks, strict=True)
        for i, (value, (integral, boolean, default)) in enumerate(checks):
            if (
                -_FLOAT32_OVERFLOW < value < _FLOAT32_OVERFLOW  # also False for NaN
                and (not integral or value == floor(value))
                and (not boolean or value == 0 or value == 1)
            ):
                continue
            bad.append(i)
            values[i] = default
            if reply[i] is not None:
                metrics.CORRUPT_VALUES.labels(self.name, self.spec.field_names[i]).inc()
        array = np.array(values, dtype=np.float64)
        array.flags.writeable = False
        if not bad:
            return _Entry(array, self.fresh, self.cached)
        defaulted = tuple(self.spec.field_names[i] for i in bad)
        return _entry(array, Source.REDIS, defaulted, Reason.INVALID)

    def decode_many(self, replies: list[tuple[str, list[bytes]]]) -> dict[str, _Entry]:
        """decode() of many complete replies (no absent field): parsed and checked as one
        array; a reply that fails any check goes through decode() on its own."""
        try:
            parsed = np.array([reply for _, reply in replies], dtype=np.float64)
        except ValueError:
            return {key: self.decode(reply) for key, reply in replies}  # type: ignore[arg-type]
        with np.errstate(invalid="ignore", over="ignore"):
            ok = np.abs(parsed) < _FLOAT32_OVERFLOW  # False for NaN
            ok &= ~self.integral | (parsed == np.floor(parsed))
            ok &= ~self.boolean | (parsed == 0) | (parsed == 1)
        parsed.flags.writeable = False  # and so each row's view
        fresh, cached = self.fresh, self.cached
        good_rows: list[bool] = np.asarray(ok.all(axis=1)).tolist()
        return {
            key: _Entry(row, fresh, cached) if good else self.decode(reply)  # type: ignore[arg-type]
            for (key, reply), row, good in zip(replies, parsed, good_rows, strict=True)
        }


_ZERO_ONE = frozenset((0.0, 1.0))
_BATCH_DECODE_MIN = 16  # replies; below this, one array costs more than it saves


def _picker(indices: list[int]) -> Callable[[list[float]], Sequence[float]]:
    """`values -> the values at indices`, as one C call (itemgetter)."""
    if not indices:
        return lambda values: ()
    if len(indices) == 1:
        (only,) = indices
        return lambda values: (values[only],)
    return operator.itemgetter(*indices)


def _floats(reply: list[bytes | None]) -> list[float]:
    try:
        return [float(raw) for raw in reply]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return [_to_float(raw) for raw in reply]


def _entry(
    values: npt.NDArray[np.float64],
    source: Source,
    defaulted: tuple[str, ...],
    reason: Reason | None,
) -> _Entry:
    return _Entry(
        values,
        GroupRead(source, defaulted, reason),
        GroupRead(Source.CACHE if source is Source.REDIS else source, defaulted, reason),
    )


def _to_float(raw: bytes | None) -> float:
    try:
        return float(raw) if raw is not None else float("nan")
    except ValueError:
        return float("nan")


class _TtlLru:
    """Entries for `ttl_s` after they were set, at most `maxsize`, least recently used
    evicted first; valid while timer() < expiry, as in cachetools' TTLCache.

    One OrderedDict in recency order: a hit costs a third of TTLCache's, a set a third
    (TTLCache keeps a second linked list and purges on every set). An expired entry
    leaves when it is next read or reaches the LRU end.
    """

    def __init__(self, maxsize: int, ttl_s: float, timer: Callable[[], float]) -> None:
        self._data: OrderedDict[str, tuple[float, _Entry]] = OrderedDict()
        self._maxsize = maxsize
        self._ttl_s = ttl_s
        self._timer = timer

    def get(self, key: str) -> _Entry | None:
        """The live entry, or None: no exception on the miss path."""
        item = self._data.get(key)
        if item is None:
            return None
        if not self._timer() < item[0]:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    def __setitem__(self, key: str, entry: _Entry) -> None:
        data = self._data
        data[key] = (self._timer() + self._ttl_s, entry)
        data.move_to_end(key)
        while len(data) > self._maxsize:
            data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class FeatureStore:
    """Feature rows by entity ids: TTL+LRU cache, one pipelined Redis read, defaults."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        groups: Sequence[FeatureGroup] = GROUPS,
        cache_ttl_s: float = 5.0,
        cache_maxsize: int = 100_000,
        error_log_interval_s: float = 10.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._groups = [_Group(group) for group in groups]
        self._width = sum(len(group.features) for group in groups)
        # One event loop per worker owns the store: no lock needed around the cache.
        self._cache = _TtlLru(cache_maxsize, cache_ttl_s, timer)
        self._inflight: dict[str, asyncio.Future[dict[str, _Entry]]] = {}
        self._error_log_interval_s = error_log_interval_s
        self._last_error_log = -float("inf")
        self._errors_unlogged = 0
        self._hits = metrics.CACHE_LOOKUPS.labels("hit")
        self._misses = metrics.CACHE_LOOKUPS.labels("miss")
        self._bound_retrieval: dict[Source, Histogram] = {}
        self._bound_defaults: dict[tuple[str, Reason], Counter] = {}

    async def read(self, rows: Sequence[Mapping[str, str]]) -> FeatureRows:
        """Values of every group for every row; never raises for a store failure.

        Each row maps entity type to id, e.g. {"user": "u1", "merchant": "m1"}.
        Raises InvalidEntityId, before any I/O, for an id that may not become a key.
        """
        started = time.perf_counter()
        row_keys = [self._keys(row) for row in rows]
        entries: dict[str, _Entry] = {}
        misses: dict[str, _Group] = {}
        cache = self._cache
        for keys in row_keys:
            for key, group in keys:
                if key in entries or key in misses:
                    continue
                entry = cache.get(key)
                if entry is None:
                    misses[key] = group
                else:
                    entries[key] = entry
        if entries:
            self._hits.inc(len(entries))
        source = Source.CACHE
        if misses:
            self._misses.inc(len(misses))
            fetched = await self._read_through(misses)
            entries |= fetched
            source = Source.REDIS
            if any(e.read.reason is Reason.UNAVAILABLE for e in fetched.values()):
                source = Source.DEFAULT
        parts: list[npt.NDArray[np.float64]] = []
        reads: list[dict[str, GroupRead]] = []
        for keys in row_keys:
            row_reads = {}
            for key, group in keys:
                entry = entries[key]
                parts.append(entry.values)
                read = entry.read if key in misses else entry.cached
                row_reads[group.name] = read
                if read.reason is not None:
                    self._defaulted(group.name, read.reason).inc()
            reads.append(row_reads)
        # One concatenation: cheaper than a slice assignment per group and row.
        values = (
            np.concatenate(parts).reshape(len(rows), self._width)
            if parts
            else np.empty((0, self._width), dtype=np.float64)
        )
        self._retrieval(source).observe(time.perf_counter() - started)
        return FeatureRows(values, reads, source)

    def _keys(self, row: Mapping[str, str]) -> list[tuple[str, _Group]]:
        keys = []
        for group in self._groups:
            try:
                entity_id = row[group.entity]
            except KeyError:
                raise InvalidEntityId(group.id_field, "is required") from None
            if type(entity_id) is not str or _valid_id(entity_id) is None:
                validate_entity_id(group.id_field, entity_id)  # raises, naming the reason
            keys.append((group.prefix + entity_id + group.suffix, group))
        return keys

    # Metric children, bound once: `.labels()` costs more than the cache lookup itself.
    # Bound on first use, so /metrics lists only series that happened.

    def _retrieval(self, source: Source) -> Histogram:
        try:
            return self._bound_retrieval[source]
        except KeyError:
            child = self._bound_retrieval[source] = metrics.RETRIEVAL_SECONDS.labels(source)
            return child

    def _defaulted(self, group: str, reason: Reason) -> Counter:
        try:
            return self._bound_defaults[group, reason]
        except KeyError:
            child = self._bound_defaults[group, reason] = metrics.DEFAULTS.labels(group, reason)
            return child

    async def _read_through(self, misses: dict[str, _Group]) -> dict[str, _Entry]:
        """Read missed keys, joining reads already in flight (single-flight)."""
        joined = {k: f for k in misses if (f := self._inflight.get(k)) is not None}
        own = {k: g for k, g in misses.items() if k not in joined} if joined else misses
        fetched: dict[str, _Entry] = {}
        if own:
            # One future per read, not per key: joiners look their keys up in its result.
            future: asyncio.Future[dict[str, _Entry]] = asyncio.get_running_loop().create_future()
            inflight = self._inflight
            for key in own:
                inflight[key] = future
            try:
                fetched = await self._fetch(own)
            finally:
                # Runs on cancellation too, so joined readers never wait forever.
                for key in own:
                    if inflight.get(key) is future:
                        del inflight[key]
                future.set_result(fetched)
            for key, entry in fetched.items():
                if entry.read.reason is not Reason.UNAVAILABLE:
                    self._cache[key] = entry
        if not joined:
            return fetched
        metrics.SHARED_READS.inc(len(joined))
        result = dict(fetched)
        for key, shared in joined.items():
            # shield: our cancellation must not cancel a future others await.
            entries = await asyncio.shield(shared)
            result[key] = entries.get(key, misses[key].unavailable)
        return result

    async def _fetch(self, keys: dict[str, _Group]) -> dict[str, _Entry]:
        """ONE non-transactional pipeline of HMGETs; failures become defaults."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, group in keys.items():
                    pipe.hmget(key, group.spec.field_names)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, len(keys))
            return {key: group.unavailable for key, group in keys.items()}
        metrics.REDIS_UP.set(1)
        return self._decode(keys, replies)

    def _decode(self, keys: dict[str, _Group], replies: list[Any]) -> dict[str, _Entry]:
        """Entries for the replies of `keys`, in order; a wrong-type key gets defaults."""
        if len(replies) < _BATCH_DECODE_MIN:
            return {
                key: group.wrongtype if isinstance(reply, Exception) else group.decode(reply)
                for (key, group), reply in zip(keys.items(), replies, strict=True)
            }
        out: dict[str, _Entry] = {}
        complete: dict[_Group, list[tuple[str, list[bytes]]]] = {}
        for (key, group), reply in zip(keys.items(), replies, strict=True):
            if isinstance(reply, Exception):
                out[key] = group.wrongtype
            elif None in reply:
                out[key] = group.decode(reply)
            else:
                complete.setdefault(group, []).append((key, reply))
        for group, group_replies in complete.items():
            out |= group.decode_many(group_replies)
        return out

    def _failed(self, exc: BaseException, n_keys: int) -> None:
        kind = (
            "timeout" if isinstance(exc, RedisTimeoutError | TimeoutError) else (type(exc).__name__)
        )
        metrics.REDIS_ERRORS.labels(kind).inc()
        metrics.REDIS_UP.set(0)
        self._errors_unlogged += 1
        now = time.monotonic()
        if now - self._last_error_log >= self._error_log_interval_s:
            logger.warning(
                "Redis read failed (%s: %s); served defaults for %d keys; "
                "%d failures since the last report",
                type(exc).__name__,
                exc,
                n_keys,
                self._errors_unlogged,
            )
            self._last_error_log = now
            self._errors_unlogged = 0
