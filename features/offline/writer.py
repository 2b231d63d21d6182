"""Writes feature groups: to the backing store first (if any), then to Redis.

In Redis, one script call per entity (by SHA) sets a hash's fields, event time and TTL
together (atomic on its key's slot), all in one non-transactional pipeline; an embedding
is one `SET key <packed little-endian float32> EX ttl` per entity in the same kind of
pipeline. The same code runs standalone, on Sentinel and on a Cluster, where a MULTI/EXEC
spanning the batch would be refused: its keys span slots. The sorted sets are the
transaction stream's to write: refused here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from features._script import Call, Script
from features.backing import BackingStore, EncodedRow
from features.connection import Client
from features.errors import BackingStoreError, FeatureWriteError
from features.spec import (
    EMBEDDING_FIELD,
    EVENT_TS_FIELD,
    VERSION_FIELD,
    Dtype,
    FeatureGroup,
    Kind,
    validate_entity_id,
)

_FLOAT32_MAX = float(np.finfo(np.float32).max)

Row = tuple[str, Mapping[str, float]]

BACKING_WRITES_AT_ONCE = 8
"""Backing-store writes in flight at once for rows of different event times."""

# KEYS[1] the group's key; ARGV[1] its TTL in seconds, then field, value, field, value...
# Under maxmemory the HSET is refused before anything is written, so nothing half-applies.
SET_WITH_TTL = Script("""
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return redis.call('EXPIRE', KEYS[1], ARGV[1])
""")


# The same, only if ARGV[2] (a version) is above the stored one; 0 if skipped.
SET_IF_NEWER = Script("""
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[2]))
if stored and stored >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")


class FeatureWriter:
    """Writes through: the backing store (if any) first, then Redis, atomically per
    entity, so Redis never holds values newer than what persists."""

    def __init__(
        self,
        client: Client,
        backing: BackingStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._backing = backing
        self._clock = clock
        self.backing_skipped = 0
        """Versioned rows the backing store did not take, since it held a newer version."""

    async def write(
        self,
        group: FeatureGroup,
        rows: Sequence[Row],
        event_ts: float | Sequence[float] | None = None,
        versions: Sequence[int] | None = None,
    ) -> int:
        """Write `(entity_id, {feature: value})` rows; returns how many were written.

        Fields not given keep their stored values; the group's event time (`event_ts`,
        default now; or one per row) is stored with them, and every written key gets the
        group's TTL. An embedding is written whole: every dimension, each finite as float32
        (a string has no room for an event time or a version). With `versions` (one per
        row, hashes only), a row reaches Redis only if its version is above the one stored
        with the key (a row skipped is not counted as written), and the backing store
        takes it on the same condition (rows it skips add to `backing_skipped`).
        A backing-store failure raises FeatureWriteError before Redis is touched. In
        Redis each row is applied whole or not at all; on FeatureWriteError, `failed`
        names the rows not written (all of them if the batch went unanswered), and
        writing the rows again is safe.
        """
        if group.kind not in (Kind.HASH, Kind.EMBEDDING):
            raise ValueError(f"{group.qualified_name} is a sorted set: the stream writes it")
        if not rows:
            return 0
        stamps = self._stamps(len(rows), event_ts)
        if versions is not None and len(versions) != len(rows):
            raise ValueError(f"versions: {len(versions)} versions for {len(rows)} rows")
        encode = _encode_embedding if group.kind is Kind.EMBEDDING else _encode
        encoded = [
            (validate_entity_id(f"{group.entity}_id", entity_id), encode(group, v))
            for entity_id, v in rows
        ]
        ids = [entity_id for entity_id, _ in rows]
        what = f"{len(rows)} {group.qualified_name} rows not written"
        if self._backing is not None:
            try:
                await self._write_backing(self._backing, group, encoded, stamps, versions)
            except BackingStoreError as exc:
                raise FeatureWriteError(
                    f"{what}: backing store {self._backing.name}: {exc}; Redis untouched",
                    failed=ids,
                ) from exc
        persisted = "" if self._backing is None else "; already persisted in the backing store"
        try:
            if group.kind is Kind.EMBEDDING:
                replies = await self._set_strings(group, encoded)
            else:
                replies = await self._set_hashes(group, encoded, stamps, versions)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError of a cluster deadline
            raise FeatureWriteError(
                f"{len(rows)} {group.qualified_name} rows not confirmed by Redis: {exc}{persisted}",
                failed=ids,
            ) from exc
        errors = [
            (entity_id, reply)
            for entity_id, reply in zip(ids, replies, strict=True)
            if isinstance(reply, Exception)
        ]
        if errors:
            raise FeatureWriteError(
                f"{len(errors)} {group.qualified_name} rows not written to Redis "
                f"({len(rows) - len(errors)} were): {errors[0][1]}{persisted}",
                failed=[entity_id for entity_id, _ in errors],
                wrong_type=[e for e, reply in errors if "WRONGTYPE" in str(reply)],
            )
        return len(rows) if versions is None else sum(reply == 1 for reply in replies)

    async def _write_backing(
        self,
        backing: BackingStore,
        group: FeatureGroup,
        encoded: Sequence[EncodedRow],
        stamps: Sequence[float],
        versions: Sequence[int] | None,
    ) -> None:
        """One backing write per distinct event time (one in the common case), at most
        BACKING_WRITES_AT_ONCE at a time; raises the first BackingStoreError."""
        by_ts: dict[float, tuple[list[EncodedRow], list[int]]] = {}
        for i, (row, ts) in enumerate(zip(encoded, stamps, strict=True)):
            rows, row_versions = by_ts.setdefault(ts, ([], []))
            rows.append(row)
            if versions is not None:
                row_versions.append(int(versions[i]))
        slots = asyncio.Semaphore(BACKING_WRITES_AT_ONCE)

        async def bounded(ts: float, part: list[EncodedRow], part_versions: list[int]) -> int:
            async with slots:
                return await backing.write(
                    group, part, ts, versions=None if versions is None else part_versions
                )

        results = await asyncio.gather(
            *(bounded(ts, part, v) for ts, (part, v) in by_ts.items()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.backing_skipped += sum(r for r in results if isinstance(r, int))

    def _stamps(self, n_rows: int, event_ts: float | Sequence[float] | None) -> list[float]:
        """One finite event time per row."""
        if event_ts is None:
            return [self._clock()] * n_rows
        if isinstance(event_ts, int | float):
            stamps = [float(event_ts)] * n_rows
        else:
            stamps = [float(ts) for ts in event_ts]
        if len(stamps) != n_rows:
            raise ValueError(f"event_ts: {len(stamps)} event times for {n_rows} rows")
        bad = next((ts for ts in stamps if not math.isfinite(ts)), None)
        if bad is not None:
            raise ValueError(f"event_ts: {bad!r} is not a finite number")
        return stamps

    async def _set_hashes(
        self,
        group: FeatureGroup,
        encoded: Sequence[tuple[str, Mapping[str, str | bytes]]],
        stamps: Sequence[float],
        versions: Sequence[int] | None,
    ) -> list[Any]:
        calls: list[Call] = []
        for i, ((entity_id, mapping), ts) in enumerate(zip(encoded, stamps, strict=True)):
            fields: dict[str, str | bytes] = {**mapping, EVENT_TS_FIELD: repr(ts)}
            if versions is not None:  # first: the script reads its name at ARGV[2]
                fields = {VERSION_FIELD: str(int(versions[i])), **fields}
            pairs = [part for item in fields.items() for part in item]
            calls.append((group.key(entity_id), [group.ttl_s, *pairs]))
        script = SET_WITH_TTL if versions is None else SET_IF_NEWER
        return await script.run(self._client, calls)

    async def _set_strings(
        self, group: FeatureGroup, encoded: Sequence[tuple[str, Mapping[str, str | bytes]]]
    ) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for entity_id, mapping in encoded:
                pipe.set(group.key(entity_id), mapping[EMBEDDING_FIELD], ex=group.ttl_s)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


def _encode_embedding(group: FeatureGroup, values: Mapping[str, float]) -> dict[str, str | bytes]:
    """`{EMBEDDING_FIELD: packed}`: every dimension, little-endian float32."""
    unknown = set(values) - set(group.field_names)
    if unknown:
        raise ValueError(f"{group.qualified_name} has no feature {sorted(unknown)[0]!r}")
    absent = [name for name in group.field_names if name not in values]
    if absent:
        raise ValueError(f"{group.qualified_name} is written whole: {absent[0]!r} is missing")
    vector = np.array([float(values[name]) for name in group.field_names], dtype=np.float64)
    if not (np.isfinite(vector).all() and (np.abs(vector) <= _FLOAT32_MAX).all()):
        raise ValueError(f"{group.qualified_name}: every dimension must be finite as float32")
    return {EMBEDDING_FIELD: vector.astype("<f4").tobytes()}


def _encode(group: FeatureGroup, values: Mapping[str, float]) -> dict[str, str | bytes]:
    dtypes = {f.name: f.dtype for f in group.features}
    out: dict[str, str | bytes] = {}
    for name, value in values.items():
        dtype = dtypes.get(name)
        if dtype is None:
            raise ValueError(f"{group.qualified_name} has no feature {name!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{name}: {value!r} is not a finite number")
        if dtype is Dtype.FLOAT:
            out[name] = repr(number)
        elif not number.is_integer() or (dtype is Dtype.BOOL and number not in (0, 1)):
            raise ValueError(f"{name}: {value!r} is not a valid {dtype}")
        else:
            out[name] = str(int(number))
    if not out:
        raise ValueError(f"no values given for {group.qualified_name}")
    return out
