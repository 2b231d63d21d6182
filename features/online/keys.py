"""Keys of the read path: one group of one entity, built once per request."""

from __future__ import annotations

from typing import NamedTuple

from features.spec import FeatureGroup

MEMBER_SEPARATOR = "#"
"""Between a member-score key and its member in Key.id; no entity id can hold it."""


class Key(NamedTuple):
    """One group of one entity: what each tier is asked for.

    `id` is the key of the cache and of single-flight: the group's Redis key, followed
    for a member-score group by the separator and `member` (the request's id of the
    group's member entity), so each (user, merchant) pair is cached on its own and
    nothing parses an id back out of a string; such a key's `member_of` is its Redis
    key (what an invalidation names). Key itself is never hashed (its group is a large
    frozen dataclass): maps are keyed by `id`.
    """

    group: FeatureGroup
    entity_id: str
    id: str
    member: str = ""
    member_of: str = ""


def key_of(group: FeatureGroup, entity_id: str, member: str = "") -> Key:
    """The key of `group` for already validated ids (`member` for member-score groups)."""
    redis_key = group.key(entity_id)
    if not member:
        return Key(group, entity_id, redis_key)
    return Key(group, entity_id, f"{redis_key}{MEMBER_SEPARATOR}{member}", member, redis_key)
