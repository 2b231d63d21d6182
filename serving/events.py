"""Scored transactions onto the stream, off the request path: a request only puts a tuple
on a bounded queue (full: dropped and counted); a task on the worker's loop drains it in
batches, one pipelined XADD per batch, at most one batch per interval, so that the task's
own work on the loop is paid once per batch, not once per request. Standalone and Sentinel
batches go out packed by hiredis over a multiplexed connection of the appender's own
(features/online/multiplex.py): redis-py's pipeline cost the loop ~1-2 ms of Python per
batch, which a request arriving meanwhile waited for. Cluster mode keeps redis-py's
pipeline (it routes each XADD by slot). A Redis failure loses that batch, counted and
logged at most once per interval; it never reaches a request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from features._log import RateLimitedLog
from features.connection import Client
from features.online.multiplex import Multiplexed, pack
from features.stream import TransactionEvent

logger = logging.getLogger("fraud.events")

APPENDED = Counter("fraud_events_appended_total", "Scored transactions appended to the stream")
DROPPED = Counter(
    "fraud_events_dropped_total",
    "Scored transactions not appended to the stream, by reason",
    ["reason"],  # queue_full, redis, shutdown
)

Pending = tuple[str | None, str, str, float, float, float]
"""(transaction id or None, user id, merchant id, amount, event time, fraud probability)"""


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """Whether and how the service appends scored transactions (FRAUD_EVENTS_*)."""

    enabled: bool = True
    queue_size: int = 10_000
    batch: int = 256
    interval_s: float = 0.05


class EventAppender:
    """The bounded queue of one worker and the task that drains it to the stream."""

    def __init__(
        self,
        client: Client,
        *,
        stream: str,
        maxlen: int,
        queue_size: int,
        batch: int,
        interval_s: float = 0.05,
        error_log_interval_s: float = 10.0,
    ) -> None:
        self._client = client
        # Its own connection: a slow append never queues behind (or ahead of) a read.
        self._mux = Multiplexed.for_client(client) if isinstance(client, aioredis.Redis) else None
        self._stream = stream
        self._maxlen = maxlen
        self._batch = batch
        self._interval_s = interval_s
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(queue_size)
        self._log = RateLimitedLog(logger, error_log_interval_s)
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._closed = False
        for reason in ("queue_full", "redis", "shutdown"):
            DROPPED.labels(reason)  # exported at 0, for rates and alerts

    def start(self) -> None:
        """Start draining, on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._drain())

    def offer(self, event: Pending) -> bool:
        """Queue one scored transaction without waiting; False (counted) if dropped."""
        if self._closed:
            DROPPED.labels("shutdown").inc()
            return False
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            DROPPED.labels("queue_full").inc()
            return False
        return True

    async def aclose(self, timeout_s: float) -> None:
        """Stop taking events; send what is queued for at most `timeout_s`, drop the rest."""
        self._closed = True
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        left = self._queue.qsize() + self._in_flight  # what the cancel below abandons
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._mux is not None:
            await self._mux.aclose()
        if left:
            DROPPED.labels("shutdown").inc(left)
            logger.warning("%d scored transactions not appended at shutdown", left)

    async def _drain(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._in_flight = 1
            try:
                await asyncio.sleep(self._interval_s)  # let a batch gather, the response go
                while len(batch) < self._batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                self._in_flight = len(batch)
                await self._send(batch)
            finally:
                self._in_flight = 0
                for _ in batch:
                    self._queue.task_done()

    async def _send(self, batch: list[Pending]) -> None:
        events = [
            TransactionEvent(tx_id or uuid.uuid4().hex, user_id, merchant_id, amount, ts, score)
            for tx_id, user_id, merchant_id, amount, ts, score in batch
        ]
        try:
            replies = await self._append(events)
        except (RedisError, OSError, TimeoutError) as exc:
            DROPPED.labels("redis").inc(len(batch))
            self._log.failed("appending scored transactions to the stream", exc, len(batch))
            return
        errors = [r for r in replies if isinstance(r, Exception)]
        APPENDED.inc(len(batch) - len(errors))
        if errors:
            DROPPED.labels("redis").inc(len(errors))
            self._log.failed("appending scored transactions to the stream", errors[0], len(errors))

    async def _append(self, events: list[TransactionEvent]) -> list[Any]:
        """One XADD per event, all in one round trip; error replies come back as values."""
        if self._mux is not None:
            head = ("XADD", self._stream, "MAXLEN", "~", self._maxlen, "*")
            payload = b"".join(
                [
                    pack(*head, *(part for item in e.fields().items() for part in item))
                    for e in events
                ]
            )
            return await self._mux.request(payload, len(events))
        async with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                fields: dict[Any, Any] = event.fields()
                pipe.xadd(self._stream, fields, maxlen=self._maxlen, approximate=True)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
