"""The persistent stores behind Redis: one interface, DynamoDB and Bigtable, Redis refill."""

from __future__ import annotations

from collections.abc import Sequence

from features.backing.base import BackingStore, EncodedRow, Record
from features.backing.restore import RestoreCounts, remaining_ttl_s, restore_to_redis
from features.settings import Settings
from features.spec import GROUPS, FeatureGroup

__all__ = [
    "BackingStore",
    "EncodedRow",
    "Record",
    "RestoreCounts",
    "open_backing",
    "remaining_ttl_s",
    "restore_to_redis",
]


def open_backing(
    settings: Settings, groups: Sequence[FeatureGroup] = GROUPS
) -> BackingStore | None:
    """The store `settings.backing_store` names, or None; clients connect lazily in the loop."""
    if settings.backing_store == "dynamodb":
        from features.backing.dynamo import DynamoStore

        return DynamoStore(
            settings.dynamodb_table,
            groups=groups,
            region=settings.dynamodb_region,
            endpoint_url=settings.dynamodb_endpoint_url or None,
        )
    if settings.backing_store == "bigtable":
        from features.backing.bigtable import BigtableStore

        return BigtableStore(
            settings.bigtable_project,
            settings.bigtable_instance,
            settings.bigtable_table,
            groups=groups,
            retention_s=settings.backing_retention_s,
        )
    return None
