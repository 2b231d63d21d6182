"""Writes feature groups to Redis: fields and TTL together, or not at all."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from features.errors import FeatureWriteError
from features.spec import Dtype, FeatureGroup, validate_entity_id

Row = tuple[str, Mapping[str, float]]


class FeatureWriter:
    """Sets groups' fields and expiry in one MULTI/EXEC pipeline per batch."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def write(self, group: FeatureGroup, rows: Sequence[Row]) -> int:
        """Write `(entity_id, {feature: value})` rows; returns how many were written.

        Fields not given keep their stored values; every written key gets the group's
        TTL. The batch is one transaction: on FeatureWriteError nothing was applied.
        """
        if not rows:
            return 0
        encoded = [
            (
                group.key(validate_entity_id(f"{group.entity}_id", entity_id)),
                _encode(group, v),
            )
            for entity_id, v in rows
        ]
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for key, mapping in encoded:
                    pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
                    pipe.expire(key, group.ttl_s)
                await pipe.execute()
        except RedisError as exc:
            raise FeatureWriteError(
                f"{len(rows)} {group.qualified_name} rows not written: {exc}"
            ) from exc
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
