"""DynamoDB backing store, on aiobotocore (async, one HTTP connection pool per worker).

One item per group of an entity. Partition key `pk` (string) = the group's Redis key,
`user:{u1}:features`; attributes: every feature (number), `_ts` (event time, number),
`grp` (`user:features`) and `eid` (the entity id), so a scan can refill Redis. An
embedding's item holds its packed float32 vector as one binary attribute, `vec`.

A versioned write (the stream's) also sets `_v`, one PutItem or UpdateItem per row with a
ConditionExpression: no `_v` yet, a lower one, or one stored with an event time
VERSION_LIFETIME_S older; a failed condition is a row skipped, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

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

BATCH_GET_MAX = 100  # BatchGetItem's limit per call
BATCH_WRITE_MAX = 25  # BatchWriteItem's limit per call
_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError)
_IF_NEWER = "attribute_not_exists(#v) OR #v < :version OR #ts < :expired"


class DynamoStore:
    """Reads with BatchGetItem (100 keys a call, unprocessed keys retried until the
    caller's deadline), eventually consistent unless told otherwise."""

    name = "dynamodb"

    def __init__(
        self,
        table: str,
        *,
        groups: Sequence[FeatureGroup] = GROUPS,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        consistent_read: bool = False,
        credentials: tuple[str, str] | None = None,
        timeout_s: float = 5.0,
        max_connections: int = 16,
        write_concurrency: int = 8,
    ) -> None:
        self.table = table
        self._groups = {g.qualified_name: g for g in groups}
        self._consistent_read = consistent_read
        self._client_args: dict[str, Any] = {
            "region_name": region,
            "endpoint_url": endpoint_url,
            "config": AioConfig(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                max_pool_connections=max_connections,
                # No SDK retries: the read path has its own deadline and breaker, and a
                # writer's caller sees the failure.
                retries={"total_max_attempts": 1},
            ),
        }
        if credentials is not None:
            self._client_args |= {
                "aws_access_key_id": credentials[0],
                "aws_secret_access_key": credentials[1],
            }
        self._write_slots = write_concurrency
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _dynamodb(self) -> Any:
        """The client, created on first use inside the running loop."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    creator = get_session().create_client("dynamodb", **self._client_args)
                    self._client = await stack.enter_async_context(creator)
                    self._stack = stack
        return self._client

    async def open(self) -> None:
        try:
            await self._dynamodb()
        except _ERRORS as exc:
            raise BackingStoreError(f"DynamoDB client: {exc}") from exc

    async def read(self, keys: Sequence[tuple[FeatureGroup, str]]) -> list[Record | None]:
        pks = list(dict.fromkeys(g.key(e) for g, e in keys))
        chunks = [pks[i : i + BATCH_GET_MAX] for i in range(0, len(pks), BATCH_GET_MAX)]
        try:
            client = await self._dynamodb()
            found: dict[str, dict[str, Any]] = {}
            for items in await asyncio.gather(*(self._batch_get(client, c) for c in chunks)):
                found |= items
        except _ERRORS as exc:
            raise BackingStoreError(f"BatchGetItem on {self.table}: {exc}") from exc
        out: list[Record | None] = []
        for group, entity_id in keys:
            item = found.get(group.key(entity_id))
            out.append(None if item is None else _record(group, item))
        return out

    async def _batch_get(self, client: Any, pks: list[str]) -> dict[str, dict[str, Any]]:
        request: dict[str, Any] = {
            self.table: {
                "Keys": [{"pk": {"S": pk}} for pk in pks],
                "ConsistentRead": self._consistent_read,
            }
        }
        found: dict[str, dict[str, Any]] = {}
        delay_s = 0.001
        while request:
            reply = await client.batch_get_item(RequestItems=request)
            for item in reply.get("Responses", {}).get(self.table, []):
                found[item["pk"]["S"]] = item
            request = reply.get("UnprocessedKeys") or {}
            if request:  # throttled: back off briefly; the caller's deadline bounds this
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.05)
        return found

    async def write(
        self,
        group: FeatureGroup,
        rows: Sequence[EncodedRow],
        event_ts: float,
        *,
        versions: Sequence[int] | None = None,
    ) -> int:
        if versions is not None:
            return await self._write_if_newer(group, rows, event_ts, versions)
        whole = len(group.features)
        if group.kind is Kind.EMBEDDING:  # always written whole, as one value
            whole = 1
        full = [r for r in rows if len(r[1]) == whole]
        partial = [r for r in rows if len(r[1]) != whole]
        slots = asyncio.Semaphore(self._write_slots)

        async def bounded(call: Any) -> None:
            async with slots:
                await call

        try:
            client = await self._dynamodb()
            calls = [
                self._put_batch(client, group, full[i : i + BATCH_WRITE_MAX], event_ts)
                for i in range(0, len(full), BATCH_WRITE_MAX)
            ]
            calls += [self._update(client, group, row, event_ts) for row in partial]
            results = await asyncio.gather(*(bounded(c) for c in calls), return_exceptions=True)
        except _ERRORS as exc:
            raise BackingStoreError(f"writing to {self.table}: {exc}") from exc
        _raise_first(results, self.table)
        return 0

    async def _write_if_newer(
        self,
        group: FeatureGroup,
        rows: Sequence[EncodedRow],
        event_ts: float,
        versions: Sequence[int],
    ) -> int:
        """One conditional write per row, at most `write_concurrency` at once; returns
        how many a newer stored version kept out."""
        if len(versions) != len(rows):
            raise ValueError(f"versions: {len(versions)} versions for {len(rows)} rows")
        slots = asyncio.Semaphore(self._write_slots)

        async def bounded(client: Any, row: EncodedRow, version: int) -> bool:
            async with slots:
                return await self._put_if_newer(client, group, row, event_ts, version)

        try:
            client = await self._dynamodb()
            results = await asyncio.gather(
                *(bounded(client, r, v) for r, v in zip(rows, versions, strict=True)),
                return_exceptions=True,
            )
        except _ERRORS as exc:
            raise BackingStoreError(f"writing to {self.table}: {exc}") from exc
        _raise_first(results, self.table)
        return sum(result is False for result in results)

    async def _put_if_newer(
        self, client: Any, group: FeatureGroup, row: EncodedRow, event_ts: float, version: int
    ) -> bool:
        """Whole groups are put (replacing the item), others updated; False if skipped."""
        entity_id, values = row
        item = _item(group, entity_id, values, event_ts) | {VERSION_FIELD: {"N": str(version)}}
        condition: dict[str, Any] = {
            "ConditionExpression": _IF_NEWER,
            "ExpressionAttributeNames": {"#v": VERSION_FIELD, "#ts": EVENT_TS_FIELD},
            "ExpressionAttributeValues": {
                ":version": {"N": str(version)},
                ":expired": {"N": repr(event_ts - VERSION_LIFETIME_S)},
            },
        }
        whole = 1 if group.kind is Kind.EMBEDDING else len(group.features)
        try:
            if len(values) == whole:
                await client.put_item(TableName=self.table, Item=item, **condition)
            else:
                del item["pk"]
                names = {f"#a{i}": name for i, name in enumerate(item)}
                await client.update_item(
                    TableName=self.table,
                    Key={"pk": {"S": group.key(entity_id)}},
                    UpdateExpression="SET " + ", ".join(f"{n} = :a{n[2:]}" for n in names),
                    ConditionExpression=_IF_NEWER,
                    ExpressionAttributeNames=names | condition["ExpressionAttributeNames"],
                    ExpressionAttributeValues={f":a{i}": v for i, v in enumerate(item.values())}
                    | condition["ExpressionAttributeValues"],
                )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise
        return True

    async def _put_batch(
        self, client: Any, group: FeatureGroup, rows: Sequence[EncodedRow], event_ts: float
    ) -> None:
        """Whole groups: BatchWriteItem puts (replacing the item), unprocessed ones retried."""
        request: dict[str, Any] = {
            self.table: [
                {"PutRequest": {"Item": _item(group, e, values, event_ts)}} for e, values in rows
            ]
        }
        for attempt in range(8):
            reply = await client.batch_write_item(RequestItems=request)
            request = reply.get("UnprocessedItems") or {}
            if not request:
                return
            await asyncio.sleep(0.01 * 2**attempt)
        raise BackingStoreError(f"{len(request[self.table])} items stayed unprocessed")

    async def _update(
        self, client: Any, group: FeatureGroup, row: EncodedRow, event_ts: float
    ) -> None:
        """Some fields of a group: UpdateItem keeps the others, as HSET does in Redis."""
        entity_id, values = row
        item = _item(group, entity_id, values, event_ts)
        del item["pk"]
        names = {f"#a{i}": name for i, name in enumerate(item)}
        await client.update_item(
            TableName=self.table,
            Key={"pk": {"S": group.key(entity_id)}},
            UpdateExpression="SET " + ", ".join(f"{n} = :v{n[2:]}" for n in names),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={f":v{i}": v for i, v in enumerate(item.values())},
        )

    async def scan(self, batch_size: int) -> AsyncIterator[list[tuple[FeatureGroup, str, Record]]]:
        args: dict[str, Any] = {"TableName": self.table, "Limit": batch_size}
        while True:
            try:
                client = await self._dynamodb()
                reply = await client.scan(**args)
            except _ERRORS as exc:
                raise BackingStoreError(f"Scan of {self.table}: {exc}") from exc
            batch = []
            for item in reply.get("Items", []):
                group = self._groups.get(item.get("grp", {}).get("S", ""))
                if group is not None:
                    batch.append((group, item["eid"]["S"], _record(group, item)))
            if batch:
                yield batch
            last = reply.get("LastEvaluatedKey")
            if not last:
                return
            args["ExclusiveStartKey"] = last

    async def create_layout(self) -> None:
        try:
            client = await self._dynamodb()
            try:
                await client.describe_table(TableName=self.table)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                    raise
            await client.create_table(
                TableName=self.table,
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
            await client.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
            )
        except _ERRORS as exc:
            raise BackingStoreError(f"creating {self.table}: {exc}") from exc

    async def aclose(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._client = None


def _raise_first(results: Sequence[object], table: str) -> None:
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise BackingStoreError(
            f"{len(failed)} of {len(results)} writes to {table} failed: {failed[0]}"
        ) from failed[0]


def _item(
    group: FeatureGroup, entity_id: str, values: Mapping[str, str | bytes], event_ts: float
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pk": {"S": group.key(entity_id)},
        "grp": {"S": group.qualified_name},
        "eid": {"S": entity_id},
        EVENT_TS_FIELD: {"N": repr(event_ts)},
    }
    item |= {
        name: {"B": value} if isinstance(value, bytes) else {"N": value}
        for name, value in values.items()
    }
    return item


def _record(group: FeatureGroup, item: Mapping[str, Any]) -> Record:
    fields: tuple[bytes | None, ...]
    if group.kind is Kind.EMBEDDING:
        vec = item.get(EMBEDDING_FIELD)
        fields = (bytes(vec["B"]) if vec is not None and "B" in vec else None,)
    else:
        fields = tuple(
            a["N"].encode() if (a := item.get(name)) is not None and "N" in a else None
            for name in group.field_names
        )
    ts = item.get(EVENT_TS_FIELD)
    return Record(fields, float(ts["N"]) if ts is not None and "N" in ts else None)
