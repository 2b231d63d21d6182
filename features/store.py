"""Feature rows for entities: in-process cache, then one Redis round trip, then defaults."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from cachetools import TTLCache
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from features import metrics
from features.breaker import CircuitBreaker
from features.errors import InvalidEntityId
from features.spec import GROUPS, Dtype, FeatureGroup, validate_entity_id

logger = logging.getLogger(__name__)


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
    CIRCUIT_OPEN = "circuit_open"  # Redis was not asked: it failed recently


# Failures of the store, not facts about the entity: never cached.
_NOT_CACHED = frozenset({Reason.UNAVAILABLE, Reason.CIRCUIT_OPEN})


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


@dataclass(frozen=True, slots=True)
class _Entry:
    values: npt.NDArray[np.float64]
    read: GroupRead  # as it came from Redis
    cached: GroupRead  # the same, served from the cache


class _Group:
    """Decoding state of one group, computed once."""

    def __init__(self, group: FeatureGroup, start: int) -> None:
        self.spec = group
        self.columns = slice(start, start + len(group.features))
        self.integral = np.array([f.dtype != Dtype.FLOAT for f in group.features])
        self.boolean = np.array([f.dtype == Dtype.BOOL for f in group.features])
        names = group.field_names
        self.missing = _entry(group.defaults, Source.DEFAULT, names, Reason.MISSING)
        self.unavailable = _entry(group.defaults, Source.DEFAULT, names, Reason.UNAVAILABLE)
        self.wrongtype = _entry(group.defaults, Source.DEFAULT, names, Reason.INVALID)
        self.circuit_open = _entry(group.defaults, Source.DEFAULT, names, Reason.CIRCUIT_OPEN)

    def decode(self, reply: list[bytes | None]) -> _Entry:
        """Turn one HMGET reply into values; bad or absent fields get their defaults."""
        if all(raw is None for raw in reply):
            return self.missing
        spec = self.spec
        try:
            parsed = np.array(reply, dtype=np.float64)  # numpy parses bytes itself
        except (TypeError, ValueError):
            parsed = np.array([_to_float(raw) for raw in reply], dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            # Finite as float32 too: the model reads float32.
            ok = np.isfinite(parsed.astype(np.float32))
            ok &= ~self.integral | (parsed == np.floor(parsed))
            ok &= ~self.boolean | (parsed == 0) | (parsed == 1)
        values = parsed
        if ok.all():
            values.flags.writeable = False
            return _entry(values, Source.REDIS, (), None)
        bad = np.flatnonzero(~ok)
        for i in bad:
            if reply[i] is not None:
                metrics.CORRUPT_VALUES.labels(spec.qualified_name, spec.field_names[i]).inc()
        values[bad] = spec.defaults[bad]
        values.flags.writeable = False
        defaulted = tuple(spec.field_names[i] for i in bad)
        return _entry(values, Source.REDIS, defaulted, Reason.INVALID)


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
        breaker: CircuitBreaker | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._breaker = breaker or CircuitBreaker()
        self._probe_task: asyncio.Task[None] | None = None  # referenced, so it is not collected
        self._groups: list[_Group] = []
        start = 0
        for group in groups:
            self._groups.append(_Group(group, start))
            start += len(group.features)
        self._width = start
        # One event loop per worker owns the store: no lock needed around the cache.
        self._cache: TTLCache[str, _Entry] = TTLCache(cache_maxsize, cache_ttl_s, timer=timer)
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}
        self._error_log_interval_s = error_log_interval_s
        self._last_error_log = -float("inf")
        self._errors_unlogged = 0

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
        metrics.CACHE_LOOKUPS.labels("hit").inc(len(entries))
        source = Source.CACHE
        if misses:
            metrics.CACHE_LOOKUPS.labels("miss").inc(len(misses))
            fetched = await self._read_through(misses)
            entries |= fetched
            source = Source.REDIS
            if any(e.read.reason in _NOT_CACHED for e in fetched.values()):
                source = Source.DEFAULT
        values = np.empty((len(rows), self._width), dtype=np.float64)
        reads: list[dict[str, GroupRead]] = []
        for i, keys in enumerate(row_keys):
            row_reads = {}
            for key, group in keys:
                entry = entries[key]
                values[i, group.columns] = entry.values
                read = entry.read if key in misses else entry.cached
                row_reads[group.spec.qualified_name] = read
                if read.reason is not None:
                    metrics.DEFAULTS.labels(group.spec.qualified_name, read.reason).inc()
            reads.append(row_reads)
        metrics.RETRIEVAL_SECONDS.labels(source).observe(time.perf_counter() - started)
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
        joined = {k: f for k in misses if (f := self._inflight.get(k)) is not None}
        own = {k: g for k, g in misses.items() if k not in joined}
        result: dict[str, _Entry] = {}
        if own:
            loop = asyncio.get_running_loop()
            futures = {k: loop.create_future() for k in own}
            self._inflight |= futures
            try:
                result = await self._fetch(own)
            finally:
                # Runs on cancellation too, so joined readers never wait forever.
                for key, future in futures.items():
                    if self._inflight.get(key) is future:
                        del self._inflight[key]
                    if not future.done():
                        future.set_result(result.get(key, own[key].unavailable))
            for key, entry in result.items():
                if entry.read.reason not in _NOT_CACHED:
                    self._cache[key] = entry
        if joined:
            metrics.SHARED_READS.inc(len(joined))
            for key, future in joined.items():
                # shield: our cancellation must not cancel a future others await.
                result[key] = await asyncio.shield(future)
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
                    pipe.hmget(key, group.spec.field_names)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as exc:
            if not _pool_exhausted(exc):  # our own backlog is no sign that Redis is down
                breaker.failure()
            self._failed(exc, len(keys))
            return {key: group.unavailable for key, group in keys.items()}
        breaker.success()
        metrics.REDIS_UP.set(1)
        return {
            key: group.wrongtype if isinstance(reply, Exception) else group.decode(reply)
            for (key, group), reply in zip(keys.items(), replies, strict=True)
        }

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
