"""Writes feature groups: to the backing store first (if any), then to Redis, fields,
event time and TTL together, or not at all."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from features.backing import BackingStore
from features.errors import BackingStoreError, FeatureWriteError
from features.spec import EVENT_TS_FIELD, Dtype, FeatureGroup, validate_entity_id

Row = tuple[str, Mapping[str, float]]


class FeatureWriter:
    """Writes through: the backing store (if any) first, then one MULTI/EXEC per batch in
    Redis, so Redis never holds values newer than what persists."""

    def __init__(
        self,
        client: aioredis.Redis,
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
        A backing-store failure raises FeatureWriteError before Redis is touched; a Redis
        failure raises it too, with nothing applied to Redis (the batch is one transaction).
        """
        if not rows:
            return 0
        ts = self._clock() if event_ts is None else float(event_ts)
        if not math.isfinite(ts):
            raise ValueError(f"event_ts: {event_ts!r} is not a finite number")
        encoded = [
            (validate_entity_id(f"{group.entity}_id", entity_id), _encode(group, v))
            for entity_id, v in rows
        ]
        what = f"{len(rows)} {group.qualified_name} rows not written"
        if self._backing is not None:
            try:
                await self._backing.write(group, encoded, ts)
            except BackingStoreError as exc:
                raise FeatureWriteError(
                    f"{what}: backing store {self._backing.name}: {exc}; Redis untouched"
                ) from exc
        stamp = {EVENT_TS_FIELD: repr(ts)}
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for entity_id, mapping in encoded:
                    key = group.key(entity_id)
                    pipe.hset(key, mapping=mapping | stamp)  # type: ignore[arg-type]
                    pipe.expire(key, group.ttl_s)
                await pipe.execute()
        except RedisError as exc:
            persisted = "" if self._backing is None else "; already persisted in the backing store"
            raise FeatureWriteError(f"{what} to Redis: {exc}{persisted}") from exc
        return len(rows)


def _encode(group: FeatureGroup, values: Mapping[str, float]) -> dict[str, str]:
    dtypes = {f.name: f.dtype for f in group.features}
    out = {}
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
