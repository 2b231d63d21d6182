"""Writes feature groups: to the backing store first (if any), then to Redis.

In Redis, one script call per entity (by SHA) sets a hash's fields, event time and TTL
together (atomic on its key's slot), all in one non-transactional pipeline; an embedding
is one `SET key <packed little-endian float32> EX ttl` per entity in the same kind of
pipeline. The same code runs standalone, on Sentinel and on a Cluster, where a MULTI/EXEC
spanning the batch would be refused: its keys span slots. The sorted sets are the
transaction stream's to write: refused here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from features._script import Call, Script
from features.backing import BackingStore
from features.connection import Client
from features.errors import BackingStoreError, FeatureWriteError
from features.spec import (
    EMBEDDING_FIELD,
    EVENT_TS_FIELD,
    Dtype,
    FeatureGroup,
    Kind,
    validate_entity_id,
)

_FLOAT32_MAX = float(np.finfo(np.float32).max)

Row = tuple[str, Mapping[str, float]]

# KEYS[1] the group's key; ARGV[1] its TTL in seconds, then field, value, field, value...
# Under maxmemory the HSET is refused before anything is written, so nothing half-applies.
SET_WITH_TTL = Script("""
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return redis.call('EXPIRE', KEYS[1], ARGV[1])
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

    async def write(
        self, group: FeatureGroup, rows: Sequence[Row], event_ts: float | None = None
    ) -> int:
        """Write `(entity_id, {feature: value})` rows; returns how many were written.

        Fields not given keep their stored values; the group's event time (`event_ts`,
        default now) is stored with them, and every written key gets the group's TTL.
        An embedding is written whole: every dimension, each finite as float32.
        A backing-store failure raises FeatureWriteError before Redis is touched. In
        Redis each row is applied whole or not at all; on FeatureWriteError, `failed`
        names the rows not written (all of them if the batch went unanswered), and
        writing the rows again is safe.
        """
        if group.kind not in (Kind.HASH, Kind.EMBEDDING):
            raise ValueError(f"{group.qualified_name} is a sorted set: the stream writes it")
        if not rows:
            return 0
        ts = self._clock() if event_ts is None else float(event_ts)
        if not math.isfinite(ts):
            raise ValueError(f"event_ts: {event_ts!r} is not a finite number")
        encode = _encode_embedding if group.kind is Kind.EMBEDDING else _encode
        encoded = [
            (validate_entity_id(f"{group.entity}_id", entity_id), encode(group, v))
            for entity_id, v in rows
        ]
        ids = [entity_id for entity_id, _ in rows]
        what = f"{len(rows)} {group.qualified_name} rows not written"
        if self._backing is not None:
            try:
                await self._backing.write(group, encoded, ts)
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
                replies = await self._set_hashes(group, encoded, ts)
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
            )
        return len(rows)

    async def _set_hashes(
        self,
        group: FeatureGroup,
        encoded: Sequence[tuple[str, Mapping[str, str | bytes]]],
        ts: float,
    ) -> list[Any]:
        stamp = {EVENT_TS_FIELD: repr(ts)}
        calls: list[Call] = []
        for entity_id, mapping in encoded:
            pairs = [part for item in {**mapping, **stamp}.items() for part in item]
            calls.append((group.key(entity_id), [group.ttl_s, *pairs]))
        return await SET_WITH_TTL.run(self._client, calls)

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
