"""Bigtable backing store, on the async data client of google-cloud-bigtable.

Row key `{entity}#{id}` (`user#u1`); one column family per feature group (named after the
group, `features`, `risk`) with a max-age GC policy; one column per feature plus `_ts`
(event time); an embedding's family holds one cell `vec`, its packed float32 vector.
Cells carry the event time as their timestamp; reads take the latest cell. Only the
groups that are persisted (hashes, embeddings) have a family.

A versioned write (the stream's) also sets a cell `_v` (the version, 8 bytes big-endian, so
that byte order is number order), one CheckAndMutateRow per row: the predicate matches a
stored `_v` at or above the new one within VERSION_LIFETIME_S of its event time, and then
nothing is written (the row is skipped); otherwise the cells are set.
"""

from __future__ import annotations

import asyncio
import datetime
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from google.api_core.exceptions import GoogleAPICallError, RetryError
from google.cloud.bigtable.data import (
    BigtableDataClientAsync,
    Mutation,
    ReadRowsQuery,
    RowMutationEntry,
    SetCell,
)
from google.cloud.bigtable.data.exceptions import MutationsExceptionGroup
from google.cloud.bigtable.data.row_filters import (
    CellsColumnLimitFilter,
    ColumnQualifierRegexFilter,
    FamilyNameRegexFilter,
    RowFilterChain,
    TimestampRangeFilter,
    ValueRangeFilter,
)

from features.backing.base import VERSION_LIFETIME_S, EncodedRow, Record
from features.errors import BackingStoreError
from features.spec import (
    EMBEDDING_FIELD,
    EVENT_TS_FIELD,
    GROUPS,
    VERSION_FIELD,
    FeatureGroup,
    Kind,
)

_ERRORS = (GoogleAPICallError, RetryError, MutationsExceptionGroup, OSError)
_TS = EVENT_TS_FIELD.encode()
_VEC = EMBEDDING_FIELD.encode()
_V = VERSION_FIELD.encode()
WRITES_AT_ONCE = 8
"""CheckAndMutateRow calls in flight at once for one versioned write."""


class BigtableStore:
    """Reads every requested row in one ReadRows call, latest cell per column."""

    name = "bigtable"

    def __init__(
        self,
        project: str,
        instance: str,
        table: str,
        *,
        groups: Sequence[FeatureGroup] = GROUPS,
        retention_s: int = 7 * 86400,
        timeout_s: float = 5.0,
    ) -> None:
        self.project, self.instance, self.table_id = project, instance, table
        self._groups = tuple(g for g in groups if g.persisted)
        self._by_entity: dict[str, list[FeatureGroup]] = {}
        for g in self._groups:
            self._by_entity.setdefault(g.entity, []).append(g)
        self._retention_s = retention_s
        self._timeout_s = timeout_s
        self._client: BigtableDataClientAsync | None = None
        self._table: Any = None
        self._lock = asyncio.Lock()

    async def _data(self) -> Any:
        """The table handle; the client must be built inside the loop that uses it."""
        if self._table is None:
            async with self._lock:
                if self._table is None:
                    self._client = BigtableDataClientAsync(project=self.project)
                    self._table = self._client.get_table(
                        self.instance,
                        self.table_id,
                        default_read_rows_operation_timeout=self._timeout_s,
                        default_read_rows_attempt_timeout=self._timeout_s,
                        default_mutate_rows_operation_timeout=self._timeout_s,
                        default_mutate_rows_attempt_timeout=self._timeout_s,
                    )
        return self._table

    async def open(self) -> None:
        try:
            await self._data()
        except _ERRORS as exc:
            raise BackingStoreError(f"Bigtable client: {exc}") from exc

    async def read(self, keys: Sequence[tuple[FeatureGroup, str]]) -> list[Record | None]:
        row_keys: list[str | bytes] = list(dict.fromkeys(_row_key(g, e) for g, e in keys))
        query = ReadRowsQuery(row_keys=row_keys, row_filter=CellsColumnLimitFilter(1))
        try:
            table = await self._data()
            rows = {row.row_key: row for row in await table.read_rows(query)}
        except _ERRORS as exc:
            raise BackingStoreError(f"ReadRows on {self.table_id}: {exc}") from exc
        out: list[Record | None] = []
        for group, entity_id in keys:
            row = rows.get(_row_key(group, entity_id))
            out.append(None if row is None else _record(group, row.cells))
        return out

    async def write(
        self,
        group: FeatureGroup,
        rows: Sequence[EncodedRow],
        event_ts: float,
        *,
        versions: Sequence[int] | None = None,
    ) -> int:
        # Bigtable keeps milliseconds; the cell timestamp is the event time, so the
        # family's max-age GC counts from when the values were true.
        micros = int(event_ts * 1000) * 1000
        if versions is not None:
            return await self._write_if_newer(group, rows, event_ts, micros, versions)
        entries = [
            RowMutationEntry(_row_key(group, entity_id), _cells(group, values, event_ts, micros))
            for entity_id, values in rows
        ]
        try:
            table = await self._data()
            await table.bulk_mutate_rows(entries)
        except _ERRORS as exc:
            raise BackingStoreError(f"MutateRows on {self.table_id}: {exc}") from exc
        return 0

    async def _write_if_newer(
        self,
        group: FeatureGroup,
        rows: Sequence[EncodedRow],
        event_ts: float,
        micros: int,
        versions: Sequence[int],
    ) -> int:
        """One CheckAndMutateRow per row, at most WRITES_AT_ONCE at once; returns how many
        rows a newer stored version kept out."""
        if len(versions) != len(rows):
            raise ValueError(f"versions: {len(versions)} versions for {len(rows)} rows")
        slots = asyncio.Semaphore(WRITES_AT_ONCE)
        since = datetime.datetime.fromtimestamp(event_ts - VERSION_LIFETIME_S, datetime.UTC)

        async def bounded(table: Any, row: EncodedRow, version: int) -> bool:
            entity_id, values = row
            encoded = _version(version)
            newer_stored = RowFilterChain(
                [
                    FamilyNameRegexFilter(group.name),
                    ColumnQualifierRegexFilter(_V),
                    CellsColumnLimitFilter(1),
                    ValueRangeFilter(start_value=encoded, inclusive_start=True),
                    TimestampRangeFilter(start=since),
                ]
            )
            cells: list[Mutation] = [
                *_cells(group, values, event_ts, micros),
                SetCell(group.name, _V, encoded, timestamp_micros=micros),
            ]
            async with slots:
                matched: bool = await table.check_and_mutate_row(
                    _row_key(group, entity_id),
                    newer_stored,
                    true_case_mutations=None,
                    false_case_mutations=cells,
                    operation_timeout=self._timeout_s,
                )
            return matched

        try:
            table = await self._data()
            results = await asyncio.gather(
                *(bounded(table, r, v) for r, v in zip(rows, versions, strict=True)),
                return_exceptions=True,
            )
        except _ERRORS as exc:
            raise BackingStoreError(f"CheckAndMutateRow on {self.table_id}: {exc}") from exc
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise BackingStoreError(
                f"{len(failed)} of {len(rows)} CheckAndMutateRow on {self.table_id}: {failed[0]}"
            ) from failed[0]
        return sum(result is True for result in results)

    async def scan(self, batch_size: int) -> AsyncIterator[list[tuple[FeatureGroup, str, Record]]]:
        query = ReadRowsQuery(row_filter=CellsColumnLimitFilter(1))
        batch: list[tuple[FeatureGroup, str, Record]] = []
        try:
            table = await self._data()
            async for row in await table.read_rows_stream(query, operation_timeout=3600):
                entity, _, entity_id = row.row_key.decode().partition("#")
                for group in self._by_entity.get(entity, ()):
                    cells = [c for c in row.cells if c.family == group.name]
                    if cells:
                        batch.append((group, entity_id, _record(group, cells)))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        except _ERRORS as exc:
            raise BackingStoreError(f"scan of {self.table_id}: {exc}") from exc
        if batch:
            yield batch

    async def create_layout(self) -> None:
        try:
            await asyncio.to_thread(self._create_layout)
        except _ERRORS as exc:
            raise BackingStoreError(f"creating {self.table_id}: {exc}") from exc

    def _create_layout(self) -> None:
        """Table and families through the (sync) admin API; sets each family's GC rule
        with ModifyColumnFamilies, which is what makes it enforced."""
        from google.cloud import bigtable
        from google.cloud.bigtable import column_family

        # The admin API's classes are untyped.
        admin = bigtable.Client(project=self.project, admin=True)  # type: ignore[no-untyped-call]
        instance = admin.instance(self.instance)  # type: ignore[no-untyped-call]
        table = instance.table(self.table_id)
        age = datetime.timedelta(seconds=self._retention_s)
        rule = column_family.MaxAgeGCRule(age)  # type: ignore[no-untyped-call]
        families = dict.fromkeys(g.name for g in self._groups)
        if not table.exists():
            table.create()
        present = table.list_column_families()
        for name in families:
            family = table.column_family(name, gc_rule=rule)
            if name in present:
                family.update()
            else:
                family.create()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._client = self._table = None


def _cells(
    group: FeatureGroup, values: Mapping[str, str | bytes], event_ts: float, micros: int
) -> list[Mutation]:
    return [
        SetCell(group.name, name.encode(), _raw(value), timestamp_micros=micros)
        for name, value in (*values.items(), (EVENT_TS_FIELD, repr(event_ts)))
    ]


def _version(version: int) -> bytes:
    return struct.pack(">Q", version)


def _raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _row_key(group: FeatureGroup, entity_id: str) -> bytes:
    return f"{group.entity}#{entity_id}".encode()


def _record(group: FeatureGroup, cells: Sequence[Any]) -> Record:
    latest: dict[bytes, bytes] = {}
    for cell in cells:
        if cell.family == group.name:
            latest.setdefault(cell.qualifier, cell.value)  # newest first within a column
    if group.kind is Kind.EMBEDDING:
        fields: tuple[bytes | None, ...] = (latest.get(_VEC),)
    else:
        fields = tuple(latest.get(name.encode()) for name in group.field_names)
    try:
        ts = float(latest[_TS])
    except (KeyError, ValueError):
        return Record(fields, None)  # no (readable) event time: never reported stale
    return Record(fields, ts)
