"""Writes feature groups to Redis: each entity's fields and TTL together, or not at all.

One EVAL per entity (HSET, then EXPIRE, in one script: atomic on its key's slot), all
in one non-transactional pipeline. The same code runs standalone, on Sentinel and on a
Cluster, where a MULTI/EXEC spanning the batch would be refused: its keys span slots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from redis.exceptions import RedisError

from features.connection import Client
from features.errors import FeatureWriteError
from features.spec import Dtype, FeatureGroup, validate_entity_id

Row = tuple[str, Mapping[str, float]]

# KEYS[1] the group's key; ARGV[1] its TTL in seconds, then field, value, field, value...
# Under maxmemory the HSET is refused before anything is written, so nothing half-applies.
SET_WITH_TTL = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


class FeatureWriter:
    """Sets groups' fields and expiry, atomically per entity, one pipeline per batch."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def write(self, group: FeatureGroup, rows: Sequence[Row]) -> int:
        """Write `(entity_id, {feature: value})` rows; returns how many were written.

        Fields not given keep their stored values; every written key gets the group's
        TTL. Each row is applied whole or not at all. On FeatureWriteError, `failed`
        names the rows not written (all of them if the batch went unanswered); writing
        the rows again is safe.
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
        ids = [entity_id for entity_id, _ in rows]
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, mapping in encoded:
                    pairs = [part for item in mapping.items() for part in item]
                    pipe.eval(SET_WITH_TTL, 1, key, group.ttl_s, *pairs)
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError of a cluster deadline
            raise FeatureWriteError(
                f"{len(rows)} {group.qualified_name} rows not confirmed: {exc}", failed=ids
            ) from exc
        errors = [
            (entity_id, reply)
            for entity_id, reply in zip(ids, replies, strict=True)
            if isinstance(reply, Exception)
        ]
        if errors:
            raise FeatureWriteError(
                f"{len(errors)} {group.qualified_name} rows not written "
                f"({len(rows) - len(errors)} were): {errors[0][1]}",
                failed=[entity_id for entity_id, _ in errors],
            )
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
