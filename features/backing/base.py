"""The interface every persistent store behind Redis meets, and the record it returns.

Two implementations: dynamo.py (DynamoDB) and bigtable.py (Bigtable), beside this file.
Values travel as the same strings Redis holds (`repr(float)`, `str(int)`; an embedding's
packed float32 bytes), with the group's event time, so what one tier serves the next can
store unchanged. Only hashes and embeddings are persisted (FeatureGroup.persisted): the
sorted sets are rebuilt from the transaction stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from features.spec import FeatureGroup

VERSION_LIFETIME_S = 30 * 86400
"""A versioned write is skipped only for a stored version whose event time is less than
this older than its own: the stream's version counters expire 31 days after an entity's
last event and start again at 1 (features/stream/velocity.py), and a write that older
never has a newer event time (an entity's windows end at its newest event)."""

EncodedRow = tuple[str, Mapping[str, str | bytes]]
"""(entity id, {feature: value as Redis stores it}); an embedding's one value is
{EMBEDDING_FIELD: its packed bytes}"""


@dataclass(frozen=True, slots=True)
class Record:
    """One group of one entity as persisted: raw values in field order (an embedding: its
    one packed value), and its event time."""

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

    async def write(
        self,
        group: FeatureGroup,
        rows: Sequence[EncodedRow],
        event_ts: float,
        *,
        versions: Sequence[int] | None = None,
    ) -> int:
        """Set the given fields and the event time of each row; others keep their values.

        With `versions` (one per row), each row is written with its version, atomically
        and only if the stored one is absent or lower (or is older than
        VERSION_LIFETIME_S); returns how many rows were skipped for a newer stored version
        (0 without versions)."""
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
