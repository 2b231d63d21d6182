"""The floor of a cache miss in Python: the least a client can do for a request's HMGETs.

One connection, an `asyncio.Protocol` whose `data_received` feeds a `hiredis.Reader`, and
each request's commands packed by hiredis and sent in one `transport.write`. No pool, no
timeouts, no decoding: `make bench` measures the feature layer against it (MEASURED.md,
"The Python floor of a miss").
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import hiredis


class FloorClient(asyncio.Protocol):
    """One request at a time over one connection; replies as hiredis parses them."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._replies: list[Any] = []
        self._expected = 0

    @classmethod
    async def connect(cls, host: str, port: int) -> FloorClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, host, port)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        replies = self._replies
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        if len(replies) == self._expected and self._waiter is not None:
            self._waiter.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionError("closed by the server"))

    async def hmget(self, commands: Sequence[tuple[str, Sequence[str]]]) -> list[Any]:
        """One HMGET per (key, fields), packed and written at once; their replies."""
        payload = b"".join(
            [hiredis.pack_command(("HMGET", key, *fields)) for key, fields in commands]  # type: ignore[arg-type]
        )
        return await self._send(payload, len(commands))

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Any `commands`, packed and written at once; their replies."""
        return await self._send(
            b"".join([hiredis.pack_command(c) for c in commands]), len(commands)
        )

    async def _send(self, payload: bytes, replies: int) -> list[Any]:
        assert self._transport is not None
        self._replies = []
        self._expected = replies
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(payload)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
