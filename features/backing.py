"""The persistent tier behind Redis: the interface both stores meet, a breaker, Redis refill.

Two implementations: features/dynamo.py (DynamoDB) and features/bigtable.py (Bigtable).
Values travel as the same strings Redis holds (`repr(float)`, `str(int)`), with the group's
event time, so what one tier serves the next can store unchanged.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from features.connection import Client
from features.settings import Settings
from features.spec import EVENT_TS_FIELD, GROUPS, FeatureGroup

EncodedRow = tuple[str, Mapping[str, str]]
"""(entity id, {feature: value as Redis stores it})"""


@dataclass(frozen=True, slots=True)
class Record:
    """One group of one entity as persisted: raw values in field order, and its event time."""

    fields: tuple[bytes | None, ...]
    event_ts: float | None


class BackingStore(Protocol):
    """What FeatureStore, FeatureWriter and the warm command need of a persistent store.

    Every method raises BackingStoreError for a failure of the store; none retries past
    its own deadline.
    """

    name: str

    async def open(self) -> None:
        """Build the client in the running loop (idempotent, no I/O awaited on the server).

        Building a client costs far more than one read (the AWS SDK loads its service
        model): FeatureStore calls this outside the read's deadline.
        """
        ...

    async def read(self, keys: Sequence[tuple[FeatureGroup, str]]) -> list[Record | None]:
        """Latest record of each (group, entity id), None where absent; one batched call."""
        ...

    async def write(self, group: FeatureGroup, rows: Sequence[EncodedRow], event_ts: float) -> None:
        """Set the given fields and the event time of each row; others keep their values."""
        ...

    def scan(self, batch_size: int) -> AsyncIterator[list[tuple[FeatureGroup, str, Record]]]:
        """Every stored (group, entity id, record), in batches of about `batch_size`."""
        ...

    async def create_layout(self) -> None:
        """Create the table (and column families) if absent; idempotent."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def open_backing(
    settings: Settings, groups: Sequence[FeatureGroup] = GROUPS
) -> BackingStore | None:
    """The store `settings.backing_store` names, or None; clients connect lazily in the loop."""
    if settings.backing_store == "dynamodb":
        from features.dynamo import DynamoStore

        return DynamoStore(
            settings.dynamodb_table,
            groups=groups,
            region=settings.dynamodb_region,
            endpoint_url=settings.dynamodb_endpoint_url or None,
        )
    if settings.backing_store == "bigtable":
        from features.bigtable import BigtableStore

        return BigtableStore(
            settings.bigtable_project,
            settings.bigtable_instance,
            settings.bigtable_table,
            groups=groups,
            retention_s=settings.backing_retention_s,
        )
    return None


# Write only where the key is absent: a writer that got there first holds newer values,
# and running the same refill twice changes nothing.
_RESTORE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


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
    sent = 0
    async with client.pipeline(transaction=False) as pipe:
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
            pipe.eval(_RESTORE_SCRIPT, 1, group.key(entity_id), *args)
            sent += 1
        replies: list[Any] = await pipe.execute() if sent else []
    written = sum(1 for r in replies if r == 1)
    counts.written += written
    counts.present += len(replies) - written
    return counts


def entity_id_of(key: str) -> str:
    """The entity id inside a group's Redis key `{entity}:{id}:{name}` (ids hold no braces)."""
    return key[key.index("{") + 1 : key.index("}")]
