"""Writing backing-store records back into Redis: read repair and the warm command."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from features._script import Call, Script
from features.backing.base import Record
from features.connection import Client
from features.spec import EVENT_TS_FIELD, FeatureGroup, Kind

# Write only where the key is absent: a writer that got there first holds newer values,
# and running the same refill twice changes nothing.
_RESTORE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")
# An embedding: the same rule for a string (SET NX would do, but a script keeps the
# replies 1 or 0, as above).
_RESTORE_STRING = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
return 1
""")


@dataclass(slots=True)
class RestoreCounts:
    """Outcome of writing backing-store records back to Redis: each record counted once."""

    written: int = 0
    present: int = 0  # Redis already held the key: left as it was
    expired: int = 0  # older than the group's TTL: Redis would not hold it either
    empty: int = 0  # nothing but an event time: nothing to serve, nothing sent
    failed: int = 0  # Redis refused its command (e.g. OOM): not written
    error: Exception | None = None  # the first refusal

    def add(self, other: RestoreCounts) -> None:
        """Accumulate `other` into this one."""
        self.written += other.written
        self.present += other.present
        self.expired += other.expired
        self.empty += other.empty
        self.failed += other.failed
        if self.error is None:
            self.error = other.error


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
    """Write records to Redis where their keys are absent, in one pipeline, TTL from event time.

    A command Redis refuses counts its record as failed, the others are counted by what
    happened to them; a pipeline that fails as a whole raises (RedisError, OSError).
    """
    counts = RestoreCounts()
    calls: list[Call] = []
    strings: list[Call] = []
    for group, entity_id, record in items:
        ttl = remaining_ttl_s(group, record.event_ts, now)
        if ttl <= 0:
            counts.expired += 1
            continue
        if group.kind is Kind.EMBEDDING:
            (raw,) = record.fields
            if raw is None:
                counts.empty += 1
            else:
                strings.append((group.key(entity_id), [ttl, raw]))
            continue
        args: list[Any] = [ttl]
        for name, raw in zip(group.field_names, record.fields, strict=True):
            if raw is not None:
                args += [name, raw]
        if len(args) == 1:
            counts.empty += 1
            continue
        if record.event_ts is not None:
            args += [EVENT_TS_FIELD, repr(record.event_ts)]
        calls.append((group.key(entity_id), args))
    replies = await _RESTORE.run(client, calls) if calls else []
    if strings:
        replies += await _RESTORE_STRING.run(client, strings)
    for reply in replies:
        if isinstance(reply, Exception):
            counts.failed += 1
            counts.error = counts.error or reply
        elif reply == 1:
            counts.written += 1
        else:
            counts.present += 1
    return counts
