"""Writing backing-store records back into Redis: read repair and the warm command."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from features._script import Call, Script
from features.backing.base import Record
from features.connection import Client
from features.spec import EVENT_TS_FIELD, FeatureGroup

# Write only where the key is absent: a writer that got there first holds newer values,
# and running the same refill twice changes nothing.
_RESTORE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")


@dataclass(slots=True)
class RestoreCounts:
    """Outcome of writing backing-store records back to Redis."""

    written: int = 0
    present: int = 0  # Redis already held the key: left as it was
    expired: int = 0  # older than the group's TTL: Redis would not hold it either

    def add(self, other: RestoreCounts) -> None:
        """Accumulate `other` into this one."""
        self.written += other.written
        self.present += other.present
        self.expired += other.expired


def remaining_ttl_s(group: FeatureGroup, event_ts: float | None, now: float) -> int:
    """The key's TTL counted from its event time (the writer's TTL if none is known)."""
    if event_ts is None:
        return group.ttl_s
    return min(group.ttl_s, math.ceil(group.ttl_s - (now - event_ts)))


async def restore_to_redis(
    client: Client,
    items: Sequence[tuple[FeatureGroup, str, Record]],
    now: float,
) -> RestoreCounts:
    """Write records to Redis where their keys are absent, in one pipeline, TTL from event time."""
    counts = RestoreCounts()
    calls: list[Call] = []
    for group, entity_id, record in items:
        ttl = remaining_ttl_s(group, record.event_ts, now)
        if ttl <= 0:
            counts.expired += 1
            continue
        args: list[Any] = [ttl]
        for name, raw in zip(group.field_names, record.fields, strict=True):
            if raw is not None:
                args += [name, raw]
        if len(args) == 1:
            continue  # nothing but an event time: nothing to serve
        if record.event_ts is not None:
            args += [EVENT_TS_FIELD, repr(record.event_ts)]
        calls.append((group.key(entity_id), args))
    replies = await _RESTORE.run(client, calls) if calls else []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply  # as the pipeline's execute() raised the first error
    written = sum(1 for r in replies if r == 1)
    counts.written += written
    counts.present += len(replies) - written
    return counts
