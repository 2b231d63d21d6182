"""Keys of the read path: one group of one entity, and the keys of a row of groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from features.errors import InvalidEntityId
from features.spec import FeatureGroup, validate_entity_id

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


class RowKeys:
    """The keys of one request row for `groups`, in their order.

    A row maps entity type to id ({"user": "u1", "merchant": "m1"}). `key_ids` gives the
    ids `key_of` would (all a cache hit needs: strings, built by concatenation) and `key`
    one whole Key, so Key objects are made for misses alone.
    """

    def __init__(self, groups: Sequence[FeatureGroup]) -> None:
        self.groups = tuple(groups)
        # Every entity type a key needs (a member-score group's member too), with its
        # request field name.
        needed = [e for g in groups for e in (g.entity, g.member) if e]
        self._entities = [(e, f"{e}_id") for e in dict.fromkeys(needed)]
        self._parts = [(g.entity, g.member, *g.key_parts) for g in groups]

    def ids(self, row: Mapping[str, str]) -> dict[str, str]:
        """The row's id of each entity type a key needs; InvalidEntityId (naming the
        request field) for one absent or unfit for a key."""
        ids: dict[str, str] = {}
        for entity, field in self._entities:
            try:
                entity_id = row[entity]
            except KeyError:
                raise InvalidEntityId(field, "is required") from None
            ids[entity] = validate_entity_id(field, entity_id)
        return ids

    def key_ids(self, ids: Mapping[str, str]) -> list[str]:
        """`key_of(group, ...).id` of each group, for ids from `ids`."""
        sep = MEMBER_SEPARATOR
        return [
            before + ids[entity] + after + sep + ids[member]
            if member
            else before + ids[entity] + after
            for entity, member, before, after in self._parts
        ]

    def key(self, column: int, ids: Mapping[str, str]) -> Key:
        """The Key of the group at `column`, for ids from `ids`."""
        group = self.groups[column]
        return key_of(group, ids[group.entity], ids[group.member] if group.member else "")
