"""The interface of a store tier on the read path (Redis, the backing store, test tiers).

The orchestrator (store.py) hands a tier the keys no earlier tier answered, of the groups
it carries, and the request's deadline; the tier answers each key with an Entry, or with
a Reason to ask the next tier (missing, unavailable, circuit open). It never raises for
a store failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from features.online.entry import Entry, Reason
from features.online.keys import Key
from features.spec import FeatureGroup

Answer = Entry | Reason
"""A tier's answer for one key: its values, or why the next tier should be asked."""

Answered = Callable[[list[Answer]], None]
"""Gets a read's answers in key order: the callback of a tier that can start a read
without a task of its own (RedisTier.start on its multiplexed connection)."""


class Tier(Protocol):
    """One store on the read path."""

    name: str

    async def open(self) -> None:
        """Build clients and warm connections; called once, outside any deadline."""
        ...

    def carries(self, group: FeatureGroup) -> bool:
        """Whether this tier stores `group` at all; asked once, when the store is built.
        A key of a group it does not carry keeps the reason the tier before gave."""
        ...

    async def read(self, keys: Sequence[Key], deadline: float) -> list[Answer]:
        """Answers in key order. `deadline` is the loop time by which the request wants
        them: the caller stops waiting then, while the tier may finish later (bounded by
        its own timeout) so its reply still fills the cache. A read that started before
        the deadline and ended after it counts as slow against the tier's breaker."""
        ...

    async def aclose(self) -> None:
        """Finish background work and release what `open` built."""
        ...
