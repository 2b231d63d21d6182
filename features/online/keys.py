"""Keys of the read path: one group of one entity, built once per request."""

from __future__ import annotations

from typing import NamedTuple

from features.spec import FeatureGroup


class Key(NamedTuple):
    """One group of one entity: what each tier is asked for.

    `id` is the group's Redis key and the key of the cache and of single-flight, so
    nothing parses an entity id back out of a string. Key itself is never hashed (its
    group is a large frozen dataclass): maps are keyed by `id`.
    """

    group: FeatureGroup
    entity_id: str
    id: str


def key_of(group: FeatureGroup, entity_id: str) -> Key:
    """The key of `group` for an already validated entity id."""
    return Key(group, entity_id, group.key(entity_id))
