"""Feature rows for entities: in-process cache, one Redis round trip, backing store, defaults."""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from cachetools import TTLCache
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from features import metrics
from features.backing import BackingStore, Record, entity_id_of, restore_to_redis
from features.breaker import CircuitBreaker
from features.connection import Client
from features.errors import BackingStoreError, InvalidEntityId
from features.spec import EVENT_TS_FIELD, GROUPS, Dtype, FeatureGroup, validate_entity_id

logger = logging.getLogger(__name__)


class Source(StrEnum):
    """Where a group's values came from."""

    CACHE = "cache"
    REDIS = "redis"
    BACKING = "backing"  # the persistent store, for keys Redis missed or failed
    DEFAULT = "default"


class Reason(StrEnum):
    """Why some or all of a group's values are its defaults."""

    MISSING = "missing"  # no such key: unknown entity, or expired
    INVALID = "invalid"  # fields absent, unparsable, or the key is not a hash
    UNAVAILABLE = "unavailable"  # Redis (and the backing store, if any) failed or timed out
    CIRCUIT_OPEN = "circuit_open"  # Redis was not asked: it failed recently


# Failures of the store, not facts about the entity: never cached.
_NOT_CACHED = frozenset({Reason.UNAVAILABLE, Reason.CIRCUIT_OPEN})


@dataclass(frozen=True, slots=True)
class GroupRead:
    """One group of one row: its source, which features fell back to defaults, and whether
    its event time is older than the group's freshness window."""

    source: Source
    defaulted: tuple[str, ...] = ()
    reason: Reason | None = None
    stale: bool = False


@dataclass(frozen=True, slots=True)
class FeatureRows:
    """Stored values (float64: timestamps need it), columns in STORED_FEATURES order."""

    values: npt.NDArray[np.float64]
    reads: list[dict[str, GroupRead]]
    source: Source
    """The slowest source any row needed: the request's latency class."""


@dataclass(frozen=True, slots=True)
class _Entry:
    values: npt.NDArray[np.float64]
    read: GroupRead  # as it came from Redis
    cached: GroupRead  # the same, served from the cache


class _Group:
    """Decoding state of one group, computed once."""

    def __init__(self, group: FeatureGroup) -> None:
        self.spec = group
        names = group.field_names
        self.fields = (*names, EVENT_TS_FIELD)  # what one HMGET asks for
        # Per field: (must be a whole number, must be 0 or 1, default).
        self.checks = tuple(
            (f.dtype != Dtype.FLOAT, f.dtype == Dtype.BOOL, float(f.default))
            for f in group.features
        )
        self.whole = _picker([i for i, f in enumerate(group.features) if f.dtype != Dtype.FLOAT])
        self.flags = _picker([i for i, f in enumerate(group.features) if f.dtype == Dtype.BOOL])
        # The GroupReads of a clean decode, by (source, stale): built once, not per read.
        self.clean = {
            (source, stale): _entry(group.defaults, source, (), None, stale)
            for source in (Source.REDIS, Source.BACKING)
            for stale in (False, True)
        }
        self.missing = _entry(group.defaults, Source.DEFAULT, names, Reason.MISSING)
        self.unavailable = _entry(group.defaults, Source.DEFAULT, names, Reason.UNAVAILABLE)
        self.wrongtype = _entry(group.defaults, Source.DEFAULT, names, Reason.INVALID)
        self.circuit_open = _entry(group.defaults, Source.DEFAULT, names, Reason.CIRCUIT_OPEN)

    def decode(self, reply: list[bytes | None], now: float) -> _Entry:
        """Turn one HMGET reply (fields, then event time) into values; bad or absent
        fields get their defaults."""
        if reply.count(None) == len(reply):
            return self.missing
        return self.decode_values(reply[:-1], _event_ts(reply[-1]), now, Source.REDIS)

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
    ) -> _Entry:
        """Values of one group from raw strings in field order."""
        stale = event_ts is not None and now - event_ts > self.spec.freshness_s
        # Plain floats: for ten fields, several times cheaper than numpy.
        values = _floats(reply)
        if self.all_valid(values):
            array = np.array(values, dtype=np.float64)
            array.flags.writeable = False
            clean = self.clean[source, stale]
            return _Entry(array, clean.read, clean.cached)
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
                metrics.CORRUPT_VALUES.labels(spec.qualified_name, spec.field_names[i]).inc()
        array = np.array(values, dtype=np.float64)
        array.flags.writeable = False
        if not bad:
            clean = self.clean[source, stale]
            return _Entry(array, clean.read, clean.cached)
        defaulted = tuple(spec.field_names[i] for i in bad)
        return _entry(array, source, defaulted, Reason.INVALID, stale)


# The smallest magnitude that becomes inf as float32 (FLT_MAX plus half an ulp):
# values must stay finite as float32, because the model reads float32.
_FLOAT32_OVERFLOW = 3.4028235677973366e38
_ZERO_ONE = frozenset((0.0, 1.0))


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
        return [float(raw) for raw in reply]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return [_to_float(raw) for raw in reply]


def _entry(
    values: npt.NDArray[np.float64],
    source: Source,
    defaulted: tuple[str, ...],
    reason: Reason | None,
    stale: bool = False,
) -> _Entry:
    cached = Source.CACHE if source in (Source.REDIS, Source.BACKING) else source
    return _Entry(
        values,
        GroupRead(source, defaulted, reason, stale),
        GroupRead(cached, defaulted, reason, stale),
    )


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


class FeatureStore:
    """Feature rows by entity ids: TTL+LRU cache, one pipelined Redis read, then (if
    configured) one backing-store read for what Redis lacked, then defaults."""

    def __init__(
        self,
        client: Client,
        *,
        groups: Sequence[FeatureGroup] = GROUPS,
        cache_ttl_s: float = 5.0,
        cache_maxsize: int = 100_000,
        error_log_interval_s: float = 10.0,
        backing: BackingStore | None = None,
        backing_timeout_s: float = 0.01,
        backing_breaker: CircuitBreaker | None = None,
        read_repair_max_tasks: int = 8,
        breaker: CircuitBreaker | None = None,
        timer: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._clock = clock  # wall time, for event-time freshness
        self._backing = backing
        self._backing_timeout_s = backing_timeout_s
        self._backing_breaker = backing_breaker or CircuitBreaker(
            name=backing.name if backing else "backing", reset_s=5.0, timer=timer
        )
        self._repair_max_tasks = read_repair_max_tasks
        self._repairs: set[asyncio.Task[None]] = set()
        self._backing_last_log = -float("inf")
        self._backing_unlogged = 0
        self._breaker = breaker or CircuitBreaker()
        self._probe_task: asyncio.Task[None] | None = None  # referenced, so it is not collected
        self._groups = [_Group(group) for group in groups]
        self._width = sum(len(group.features) for group in groups)
        # One event loop per worker owns the store: no lock needed around the cache.
        self._cache: TTLCache[str, _Entry] = TTLCache(cache_maxsize, cache_ttl_s, timer=timer)
        self._inflight: dict[str, asyncio.Future[dict[str, _Entry]]] = {}
        self._error_log_interval_s = error_log_interval_s
        self._last_error_log = -float("inf")
        self._errors_unlogged = 0
        # Label children bound once: .labels() costs about a microsecond per call.
        self._hits = metrics.CACHE_LOOKUPS.labels("hit")
        self._misses = metrics.CACHE_LOOKUPS.labels("miss")
        self._retrieval = {s: metrics.RETRIEVAL_SECONDS.labels(s) for s in Source}

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
                try:
                    entries[key] = cache[key]
                except KeyError:
                    misses[key] = group
        if entries:
            self._hits.inc(len(entries))
        source = Source.CACHE
        if misses:
            self._misses.inc(len(misses))
            fetched = await self._read_through(misses)
            entries |= fetched
            source = Source.REDIS
            if any(e.read.source is Source.BACKING for e in fetched.values()):
                source = Source.BACKING
            if any(e.read.reason in _NOT_CACHED for e in fetched.values()):
                source = Source.DEFAULT
        parts: list[npt.NDArray[np.float64]] = []
        reads: list[dict[str, GroupRead]] = []
        for keys in row_keys:
            row_reads = {}
            for key, group in keys:
                entry = entries[key]
                parts.append(entry.values)
                read = entry.read if key in misses else entry.cached
                row_reads[group.spec.qualified_name] = read
                if read.reason is not None:
                    metrics.DEFAULTS.labels(group.spec.qualified_name, read.reason).inc()
                if read.stale:
                    metrics.STALE.labels(group.spec.qualified_name, read.source).inc()
            reads.append(row_reads)
        # One concatenation: cheaper than a slice assignment per group and row.
        values = (
            np.concatenate(parts).reshape(len(rows), self._width)
            if parts
            else np.empty((0, self._width), dtype=np.float64)
        )
        self._retrieval[source].observe(time.perf_counter() - started)
        return FeatureRows(values, reads, source)

    def _keys(self, row: Mapping[str, str]) -> list[tuple[str, _Group]]:
        keys = []
        for group in self._groups:
            entity = group.spec.entity
            try:
                entity_id = row[entity]
            except KeyError:
                raise InvalidEntityId(f"{entity}_id", "is required") from None
            keys.append((group.spec.key(validate_entity_id(f"{entity}_id", entity_id)), group))
        return keys

    async def _read_through(self, misses: dict[str, _Group]) -> dict[str, _Entry]:
        """Read missed keys, joining reads already in flight (single-flight)."""
        inflight = self._inflight
        joined = {k: f for k in misses if (f := inflight.get(k)) is not None}
        own = {k: g for k, g in misses.items() if k not in joined} if joined else misses
        result: dict[str, _Entry] = {}
        if own:
            # One future per read, not per key: joiners look their keys up in its result.
            future: asyncio.Future[dict[str, _Entry]] = asyncio.get_running_loop().create_future()
            for key in own:
                inflight[key] = future
            try:
                result = await self._fetch(own)
                if self._backing is not None:
                    result = await self._from_backing(self._backing, own, result)
            finally:
                # Runs on cancellation too (result then lacks keys: joiners get defaults),
                # so joined readers never wait forever.
                for key in own:
                    if inflight.get(key) is future:
                        del inflight[key]
                future.set_result(result)
            for key, entry in result.items():
                if entry.read.reason not in _NOT_CACHED:
                    self._cache[key] = entry
        if not joined:
            return result
        metrics.SHARED_READS.inc(len(joined))
        result = dict(result)
        for key, shared in joined.items():
            # shield: our cancellation must not cancel a future others await.
            entries = await asyncio.shield(shared)
            result[key] = entries.get(key, misses[key].unavailable)
        return result

    async def _fetch(self, keys: dict[str, _Group]) -> dict[str, _Entry]:
        """ONE non-transactional pipeline of HMGETs; failures become defaults.

        While the breaker is open this returns defaults without touching the network.
        """
        breaker = self._breaker
        if not breaker.allow():
            if breaker.claim_probe():
                # Off the request path: no request waits to learn whether Redis is back.
                self._probe_task = asyncio.create_task(self._probe())
            return {key: group.circuit_open for key, group in keys.items()}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, group in keys.items():
                    pipe.hmget(key, group.fields)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as exc:
            if not _pool_exhausted(exc):  # our own backlog is no sign that Redis is down
                breaker.failure()
            self._failed(exc, len(keys))
            return {key: group.unavailable for key, group in keys.items()}
        breaker.success()
        metrics.REDIS_UP.set(1)
        now = self._clock()
        return {
            key: group.wrongtype if isinstance(reply, Exception) else group.decode(reply, now)
            for (key, group), reply in zip(keys.items(), replies, strict=True)
        }

    async def _from_backing(
        self, backing: BackingStore, keys: dict[str, _Group], result: dict[str, _Entry]
    ) -> dict[str, _Entry]:
        """The backing-store step: one read, under its deadline and breaker, of the keys
        Redis missed or failed; what it finds is written back to Redis off the request path."""
        wanted = [
            k
            for k, e in result.items()
            if e.read.reason is Reason.MISSING or e.read.reason in _NOT_CACHED
        ]
        if not wanted:
            return result
        breaker = self._backing_breaker
        if not (breaker.allow() or breaker.claim_probe()):
            metrics.BACKING_READS.labels(backing.name, "skipped").inc()
            return result | {k: keys[k].unavailable for k in wanted}
        try:
            await backing.open()  # once per worker: not counted against the deadline
            started = time.perf_counter()
            async with asyncio.timeout(self._backing_timeout_s):
                records = await backing.read([(keys[k].spec, entity_id_of(k)) for k in wanted])
        except (TimeoutError, BackingStoreError) as exc:
            breaker.failure()
            kind = "timeout" if isinstance(exc, TimeoutError) else "error"
            metrics.BACKING_READS.labels(backing.name, kind).inc()
            self._backing_failed(f"{backing.name} read", exc, len(wanted))
            # The store of record could not be asked: unknown, not missing (and not cached).
            return result | {k: keys[k].unavailable for k in wanted}
        except BaseException:
            breaker.abandon()  # cancelled: no answer either way, the next read may probe
            raise
        breaker.success()
        metrics.BACKING_READS.labels(backing.name, "ok").inc()
        metrics.BACKING_SECONDS.labels(backing.name).observe(time.perf_counter() - started)
        now = self._clock()
        merged = dict(result)
        repair: list[tuple[FeatureGroup, str, Record]] = []
        for key, record in zip(wanted, records, strict=True):
            group = keys[key]
            if record is None or all(raw is None for raw in record.fields):
                merged[key] = group.missing  # the store of record has no such entity
                continue
            merged[key] = group.decode_values(record.fields, record.event_ts, now, Source.BACKING)
            if result[key].read.reason is Reason.MISSING:  # Redis answered: refill it
                repair.append((group.spec, entity_id_of(key), record))
        if repair:
            self._schedule_repair(repair)
        return merged

    def _schedule_repair(self, items: list[tuple[FeatureGroup, str, Record]]) -> None:
        if len(self._repairs) >= self._repair_max_tasks:
            metrics.READ_REPAIRS.labels("dropped").inc(len(items))
            return
        task = asyncio.create_task(self._repair(items))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _repair(self, items: list[tuple[FeatureGroup, str, Record]]) -> None:
        try:
            counts = await restore_to_redis(self._client, items, self._clock())
        except (TimeoutError, RedisError, OSError) as exc:
            metrics.READ_REPAIRS.labels("failed").inc(len(items))
            self._backing_failed("read repair", exc, len(items))
            return
        metrics.READ_REPAIRS.labels("written").inc(counts.written)
        metrics.READ_REPAIRS.labels("present").inc(counts.present)
        metrics.READ_REPAIRS.labels("expired").inc(counts.expired)

    def _backing_failed(self, what: str, exc: BaseException, n_keys: int) -> None:
        now = time.monotonic()
        self._backing_unlogged += 1
        if now - self._backing_last_log >= self._error_log_interval_s:
            logger.warning(
                "%s failed (%s: %s) for %d keys; %d failures since the last report",
                what,
                type(exc).__name__,
                exc,
                n_keys,
                self._backing_unlogged,
            )
            self._backing_last_log = now
            self._backing_unlogged = 0

    async def wait_repairs(self) -> None:
        """Wait for the read repairs in flight (tests, shutdown)."""
        while self._repairs:
            await asyncio.gather(*self._repairs, return_exceptions=True)

    async def aclose(self) -> None:
        """Finish read repairs and close the backing store; the Redis client is the caller's."""
        await self.wait_repairs()
        if self._backing is not None:
            await self._backing.aclose()

    async def _probe(self) -> None:
        """The half-open breaker's question to Redis: PING, under the same timeouts."""
        try:
            await self._client.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            if _pool_exhausted(exc):
                self._breaker.abandon()  # no answer either way: the next read probes
            else:
                self._breaker.failure()
            self._failed(exc, 0)
        except BaseException:
            self._breaker.abandon()  # cancelled (shutdown)
            raise
        else:
            self._breaker.success()
            metrics.REDIS_UP.set(1)

    def _failed(self, exc: BaseException, n_keys: int) -> None:
        if _pool_exhausted(exc):
            kind = "pool_exhausted"
        elif isinstance(exc, RedisTimeoutError | TimeoutError):
            kind = "timeout"
        else:
            kind = type(exc).__name__
        metrics.REDIS_ERRORS.labels(kind).inc()
        if kind != "pool_exhausted":
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


def _pool_exhausted(exc: BaseException) -> bool:
    """True for BlockingConnectionPool's timeout waiting for a free connection."""
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, TimeoutError)
