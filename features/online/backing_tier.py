"""The backing-store tier: one batched read under its own timeout and breaker, and read
repair of what it found back into Redis, off the request path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from redis.exceptions import RedisError

from features import looplag, metrics
from features._log import RateLimitedLog
from features.backing import BackingStore, Record, restore_to_redis
from features.breaker import CircuitBreaker
from features.connection import Client
from features.errors import BackingStoreError
from features.online.entry import Reason, Source
from features.online.keys import Key
from features.online.reads import Codec
from features.online.tier import Answer
from features.spec import FeatureGroup
from features.tracing import TRACING

logger = logging.getLogger(__name__)


class BackingTier:
    """Reads the keys Redis missed or failed from the store of record."""

    def __init__(
        self,
        store: BackingStore,
        codecs: Mapping[str, Codec],
        *,
        repair_client: Client,
        repair_when: Callable[[], bool] = lambda: True,
        timeout_s: float = 0.01,
        breaker: CircuitBreaker | None = None,
        read_repair_max_tasks: int = 8,
        error_log_interval_s: float = 10.0,
        timer: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.name = store.name
        self._codecs = codecs
        self._repair_client = repair_client
        self._repair_when = repair_when  # e.g. Redis's breaker is closed
        self._timeout_s = timeout_s
        self.breaker = breaker or CircuitBreaker(name=store.name, reset_s=5.0, timer=timer)
        self._repair_max_tasks = read_repair_max_tasks
        self._repairs: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._log = RateLimitedLog(logger, error_log_interval_s)
        self._bugs = RateLimitedLog(
            logger, error_log_interval_s, level=logging.ERROR, exc_info=True
        )
        self._lag = looplag.IDLE  # until `open`

    async def open(self) -> None:
        """Build the store's client (the AWS SDK takes ~130 ms): never inside a deadline;
        start watching the loop's lateness for the slow-call rule."""
        if self._lag is looplag.IDLE:
            self._lag = looplag.acquire()
        await self.store.open()

    def carries(self, group: FeatureGroup) -> bool:
        """Hashes and embeddings; the sorted sets are rebuilt from the stream, not kept."""
        return group.persisted

    async def read(self, keys: Sequence[Key], deadline: float) -> list[Answer]:
        """Each key's entry, MISSING where the store has none, UNAVAILABLE on failure."""
        breaker = self.breaker
        name = self.name
        if not (breaker.allow() or breaker.claim_probe()):
            metrics.BACKING_READS.labels(name, "skipped").inc()
            return [Reason.UNAVAILABLE] * len(keys)
        loop = asyncio.get_running_loop()
        tracer = TRACING.active()
        span = None if tracer is None else self._start_span(tracer, len(keys))
        try:
            await self.store.open()  # once per worker (a no-op after): not timed
            started, late_s = loop.time(), self._lag.late_s()
            async with asyncio.timeout(self._timeout_s):
                records = await self.store.read([(key.group, key.entity_id) for key in keys])
        except (TimeoutError, BackingStoreError) as exc:
            breaker.failure()
            kind = "timeout" if isinstance(exc, TimeoutError) else "error"
            metrics.BACKING_READS.labels(name, kind).inc()
            self._log.failed(f"{name} read", exc, len(keys))
            if span is not None:
                span.set_attribute("error.type", kind)
                span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            # The store of record could not be asked: unknown, not missing (and not cached).
            return [Reason.UNAVAILABLE] * len(keys)
        except BaseException:
            breaker.abandon()  # cancelled: no answer either way, the next read may probe
            raise
        else:
            if span is not None:
                span.set_attribute("features.found", sum(r is not None for r in records))
        finally:
            if span is not None:
                span.end()
        ended = loop.time()
        # Slow if it ended after the deadline even without the loop's busy time.
        if started < deadline < self._lag.discounted(ended, late_s):
            breaker.slow()
        else:
            breaker.success()
        metrics.BACKING_READS.labels(name, "ok").inc()
        metrics.BACKING_SECONDS.labels(name).observe(ended - started)
        now = self._clock()
        answers: list[Answer] = []
        repair: list[tuple[FeatureGroup, str, Record]] = []
        for key, record in zip(keys, records, strict=True):
            if record is None or all(raw is None for raw in record.fields):
                answers.append(Reason.MISSING)  # the store of record has no such entity
                continue
            codec = self._codecs[key.group.qualified_name]
            answers.append(codec.decode_values(record.fields, record.event_ts, now, Source.BACKING))
            repair.append((key.group, key.entity_id, record))
        if repair and self._repair_when():
            self._schedule_repair(repair)
        return answers

    def _start_span(self, tracer: Tracer, n_keys: int) -> Span:
        # A child of the current span: the feature step's, copied into the read's task.
        return tracer.start_span(
            "features.backing",
            kind=SpanKind.CLIENT,
            attributes={"features.backing.store": self.name, "features.keys": n_keys},
        )

    def _schedule_repair(self, items: list[tuple[FeatureGroup, str, Record]]) -> None:
        if len(self._repairs) >= self._repair_max_tasks:
            metrics.READ_REPAIRS.labels("dropped").inc(len(items))
            return
        task = asyncio.create_task(self._repair(items))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _repair(self, items: list[tuple[FeatureGroup, str, Record]]) -> None:
        try:
            counts = await restore_to_redis(self._repair_client, items, self._clock())
        except (TimeoutError, RedisError, OSError) as exc:
            metrics.READ_REPAIRS.labels("failed").inc(len(items))
            self._log.failed("read repair", exc, len(items))
            return
        except Exception as exc:  # a bug: no one awaits this task, so it is reported here
            metrics.READ_REPAIRS.labels("failed").inc(len(items))
            self._bugs.failed("read repair", exc, len(items))
            return
        metrics.READ_REPAIRS.labels("written").inc(counts.written)
        metrics.READ_REPAIRS.labels("present").inc(counts.present)
        metrics.READ_REPAIRS.labels("expired").inc(counts.expired)
        if counts.error is not None:  # Redis refused some (e.g. full): only those failed
            metrics.READ_REPAIRS.labels("failed").inc(counts.failed)
            self._log.failed("read repair", counts.error, counts.failed)

    async def wait_repairs(self) -> None:
        """Wait for the read repairs in flight (tests, shutdown)."""
        while self._repairs:
            await asyncio.gather(*self._repairs, return_exceptions=True)

    async def aclose(self) -> None:
        """Finish read repairs and close the store."""
        if self._lag is not looplag.IDLE:
            looplag.release(self._lag)
            self._lag = looplag.IDLE
        await self.wait_repairs()
        await self.store.aclose()
