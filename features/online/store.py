"""The read path's orchestrator: cache, then each store tier in turn, then defaults, all
under one deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from opentelemetry.trace import Span

from features import metrics
from features._log import RateLimitedLog
from features.backing import BackingStore
from features.breaker import CircuitBreaker
from features.connection import Client
from features.online.backing_tier import BackingTier
from features.online.cache import UNTRACKED, EntryCache
from features.online.codec import codec_for
from features.online.entry import NOT_CACHED, Entry, FeatureRows, GroupRead, Reason, Source
from features.online.health import MAX_PENDING, HealthTally
from features.online.keys import Key, RowKeys
from features.online.reads import Codec
from features.online.redis_tier import RedisTier
from features.online.tier import Answer, Tier
from features.online.tracking import Tracking
from features.spec import GROUPS, FeatureGroup
from features.tracing import TRACING

logger = logging.getLogger(__name__)

_Served = tuple[npt.NDArray[np.float64], GroupRead, int, float]
"""One key's values as served, its read, the read's slot (HealthTally: `2 * read_id`, + 1 from
the cache) and its event time."""


class FeatureStore:
    """Feature rows by entity ids: the in-process cache, then one pipelined Redis read,
    then (if configured) one backing-store read for what Redis lacked (of the groups it
    persists), then defaults.

    `deadline_s` bounds the whole step for the caller: joins of reads in flight and every
    tier. At the deadline each group still unanswered gets the last value this worker read
    for it (if younger than `stale_max_age_s`), else its defaults, both with reason
    `deadline`; the reads go on in the background and fill the cache when they land.
    `multiplex` reads Redis through the tier's own multiplexed connection instead of
    `client`'s pool (RedisTier; not in cluster mode). `tiers` replaces the Redis and
    backing tiers (tests run the chain on in-memory ones).

    Feature health (features/online/health.py: groups served by source, features served as
    defaults, the age of served values from their event time on `clock`) and the cache's
    hits and misses are logged per read and written to their metrics once `health_flush_s`
    has passed on `clock`, when the log holds MAX_PENDING groups, and when the store
    closes.

    `invalidation` (with `multiplex`, outside cluster mode) has Redis track the keys the
    connection reads and push an invalidation when one changes (features/online/
    tracking.py): an invalidated key leaves the cache at once, and while tracking is live
    entries stay fresh for `cache_tracked_ttl_s` (if longer) instead of `cache_ttl_s`.
    `tracking` is that session's state (features/online/tracking.py), None without it.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        groups: Sequence[FeatureGroup] = GROUPS,
        deadline_s: float | None = None,
        stale_max_age_s: float = 300.0,
        cache_ttl_s: float = 5.0,
        cache_maxsize: int = 100_000,
        invalidation: bool = False,
        cache_tracked_ttl_s: float | None = None,
        error_log_interval_s: float = 10.0,
        backing: BackingStore | None = None,
        backing_timeout_s: float = 0.01,
        backing_breaker: CircuitBreaker | None = None,
        read_repair_max_tasks: int = 8,
        breaker: CircuitBreaker | None = None,
        multiplex: bool = False,
        health_flush_s: float = 1.0,
        tiers: Sequence[Tier] | None = None,
        timer: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError("deadline_s must be positive")
        self._groups = [codec_for(group) for group in groups]
        self._row_keys = RowKeys(groups)
        self._names = [codec.name for codec in self._groups]
        self._codecs = {codec.name: codec for codec in self._groups}
        self._width = sum(len(group.features) for group in groups)
        self._deadline_s = deadline_s
        self._timer = timer  # cache freshness
        self._clock = clock  # wall time, for the age of served values
        self._health = HealthTally(self._groups)  # groups in row order
        self._health_flush_s = health_flush_s
        self._health_flushed = clock()
        self._health_log = RateLimitedLog(
            logger, error_log_interval_s, level=logging.ERROR, exc_info=True
        )
        # Never shorter than the short TTL: a setting of the short one alone (say an hour)
        # keeps meaning what it meant.
        tracked_ttl_s = max(cache_ttl_s, cache_tracked_ttl_s or 0.0)
        self._cache = EntryCache(
            cache_maxsize,
            cache_ttl_s,
            max(cache_ttl_s, tracked_ttl_s, stale_max_age_s),  # a fresh entry is a last one
            tracked_ttl_s,
        )
        self._backing: BackingTier | None = None
        # One event loop per worker owns the store: no lock around the cache or these.
        self._inflight: dict[str, _Flight] = {}
        # Member reads in flight by the Redis key an invalidation would name: key id -> flight.
        self._inflight_members: dict[str, dict[str, _Flight]] = {}
        self._started = 0  # reads started without a task (`_start`), not yet answered
        self._idle: asyncio.Event | None = None  # set when that count falls to 0
        self.tracking: Tracking | None = None
        if tiers is None:
            if client is None:
                raise ValueError("FeatureStore needs a Redis client or its tiers")
            if invalidation and multiplex and isinstance(client, aioredis.Redis):
                self.tracking = Tracking(
                    self._cache, self._invalidate, error_log_interval_s=error_log_interval_s
                )
            elif invalidation:
                logger.info("cache invalidation is off: it needs the multiplexed reader")
            tiers = self._standard_tiers(
                client,
                breaker=breaker,
                multiplex=multiplex,
                error_log_interval_s=error_log_interval_s,
                backing=backing,
                backing_timeout_s=backing_timeout_s,
                backing_breaker=backing_breaker,
                read_repair_max_tasks=read_repair_max_tasks,
                timer=timer,
                clock=clock,
            )
        self._tiers = tuple(tiers)
        # Per tier: the groups it carries, None for all of them (asked once, here).
        self._carried: list[frozenset[str] | None] = []
        for tier in self._tiers:
            carried = frozenset(c.name for c in self._groups if tier.carries(c.spec))
            self._carried.append(None if len(carried) == len(self._groups) else carried)
        self._reads: set[asyncio.Task[None]] = set()  # referenced, so none is collected
        # Label children bound once: .labels() costs about a microsecond per call.
        self._hits = metrics.CACHE_LOOKUPS.labels("hit")
        self._misses = metrics.CACHE_LOOKUPS.labels("miss")
        self._lookups = [0, 0]  # hits and misses since the last flush_health
        self._retrieval = {s: metrics.RETRIEVAL_SECONDS.labels(s) for s in Source}
        self._invalidated = {
            r: metrics.INVALIDATED_KEYS.labels(r) for r in ("dropped", "absent", "in_flight")
        }

    def _standard_tiers(
        self,
        client: Client,
        *,
        breaker: CircuitBreaker | None,
        multiplex: bool,
        error_log_interval_s: float,
        backing: BackingStore | None,
        backing_timeout_s: float,
        backing_breaker: CircuitBreaker | None,
        read_repair_max_tasks: int,
        timer: Callable[[], float],
        clock: Callable[[], float],
    ) -> list[Tier]:
        redis_tier = RedisTier(
            client,
            self._codecs,
            breaker=breaker,
            multiplex=multiplex,
            tracking=self.tracking,
            probe_slow_s=self._deadline_s,
            error_log_interval_s=error_log_interval_s,
            timer=timer,
            clock=clock,
        )
        if backing is None:
            return [redis_tier]
        self._backing = BackingTier(
            backing,
            self._codecs,
            repair_client=client,
            repair_when=redis_tier.breaker.allow,
            timeout_s=backing_timeout_s,
            breaker=backing_breaker,
            read_repair_max_tasks=read_repair_max_tasks,
            error_log_interval_s=error_log_interval_s,
            timer=timer,
            clock=clock,
        )
        return [redis_tier, self._backing]

    async def open(self) -> None:
        """Build every tier's clients (outside any deadline); reads call nothing else first."""
        for tier in self._tiers:
            await tier.open()

    async def read(self, rows: Sequence[Mapping[str, str]]) -> FeatureRows:
        """Values of every group for every row; never raises for a store failure.

        Each row maps entity type to id, e.g. {"user": "u1", "merchant": "m1"}.
        Raises InvalidEntityId, before any I/O, for an id that may not become a key.
        With tracing on, under a recorded span, the step is the span `features.read`,
        current while the tiers run: the read task copies the context when it is created,
        so the tiers' spans are its children even after the deadline has ended it.
        """
        tracer = TRACING.active()
        if tracer is None:
            return await self._read(rows, None)
        with tracer.start_as_current_span("features.read") as span:
            return await self._read(rows, span)

    async def _read(self, rows: Sequence[Mapping[str, str]], span: Span | None) -> FeatureRows:
        started = time.perf_counter()
        row_keys = self._row_keys
        row_ids = [row_keys.ids(row) for row in rows]
        key_ids = [key_id for ids in row_ids for key_id in row_keys.key_ids(ids)]
        now = self._timer()
        fresh = self._cache.fresh
        codecs = self._groups
        per_row = len(codecs)
        served: dict[str, _Served] = {}
        misses: dict[str, tuple[Key, Codec]] = {}
        for i, key_id in enumerate(key_ids):
            if key_id in served or key_id in misses:
                continue
            cached = fresh(key_id, now)
            codec = codecs[i % per_row]
            if cached is None:  # a Key only now: a hit needs its id alone
                misses[key_id] = row_keys.key(i % per_row, row_ids[i // per_row]), codec
            else:
                read_id = cached[1]
                served[key_id] = cached[0], codec.reads[read_id][1], 2 * read_id + 1, cached[2]
        hits = len(served)
        lookups = self._lookups
        lookups[0] += hits
        source = Source.CACHE
        late: list[str] | None = None if span is None else []
        if misses:
            lookups[1] += len(misses)
            source = await self._read_misses(misses, served, now, late, span)
        parts: list[npt.NDArray[np.float64]] = []
        reads: list[dict[str, GroupRead]] = []
        row_reads: dict[str, GroupRead] = {}
        names = self._names
        log_slot, log_age = self._health.slots.append, self._health.ages.append
        wall = self._clock()
        for i, key_id in enumerate(key_ids):
            values, read, read_slot, event_ts = served[key_id]
            parts.append(values)
            column = i % per_row
            row_reads[names[column]] = read
            log_slot(read_slot * per_row + column)
            log_age(wall - event_ts)  # NaN without an event time
            if column == per_row - 1:
                reads.append(row_reads)
                row_reads = {}
        if (
            not 0.0 <= wall - self._health_flushed < self._health_flush_s  # or stepped back
            or len(self._health.slots) >= MAX_PENDING
        ):
            self.flush_health(wall)
        # One concatenation: cheaper than a slice assignment per group and row.
        values = (
            np.concatenate(parts).reshape(len(rows), self._width)
            if parts
            else np.empty((0, self._width), dtype=np.float64)
        )
        self._retrieval[source].observe(time.perf_counter() - started)
        if span is not None and late is not None:
            span.set_attributes(
                {
                    "features.rows": len(rows),
                    "features.keys": len(served),
                    "features.cache_hits": hits,
                    "features.source": source.value,
                    "features.deadline_groups": sorted(set(late)),
                }
            )
        return FeatureRows(values, reads, source)

    def flush_health(self, now: float | None = None) -> None:
        """Write the health tallies and the cache lookups to their metrics (`now`: the
        wall clock, if read)."""
        self._health_flushed = self._clock() if now is None else now
        hits, misses = self._lookups
        self._lookups = [0, 0]
        try:
            if hits:
                self._hits.inc(hits)
            if misses:
                self._misses.inc(misses)
            self._health.flush()
        except Exception as exc:  # a metrics write must never fail a read
            self._health_log.failed("feature health metrics write", exc)

    async def _read_misses(
        self,
        misses: dict[str, tuple[Key, Codec]],
        served: dict[str, _Served],
        now: float,
        late: list[str] | None,
        span: Span | None,
    ) -> Source:
        """Serve the cache's misses: join reads in flight, start one for the rest, wait
        until the deadline; what is still unanswered then gets the deadline's fallback
        (its group goes to `late`, if given). Returns the slowest source used."""
        loop = asyncio.get_running_loop()
        deadline = float("inf") if self._deadline_s is None else loop.time() + self._deadline_s
        inflight = self._inflight
        waits: dict[str, _Flight] = {}
        own: list[Key] = []
        for key_id, (key, _) in misses.items():
            joined = inflight.get(key_id)
            if joined is None:
                own.append(key)
            else:
                waits[key_id] = joined
        if waits:
            metrics.SHARED_READS.inc(len(waits))
        if span is not None:
            span.set_attribute("features.joined", len(waits))
        if own:
            # One flight per read, not per key: joiners look their keys up in its result.
            flight = _Flight(self._cache.session)
            for key in own:
                inflight[key.id] = flight
                waits[key.id] = flight
                if key.member_of:
                    self._inflight_members.setdefault(key.member_of, {})[key.id] = flight
            if not self._start(own, flight, deadline):
                self._spawn(self._fetch(own, flight, deadline))
        pending = [flight for flight in set(waits.values()) if flight.result is None]
        if pending:
            waiter = _Waiter(loop.create_future(), len(pending))
            for flight in pending:
                flight.waiters.append(waiter)
            timer = None if self._deadline_s is None else loop.call_at(deadline, waiter.wake)
            try:
                await waiter.future
            finally:
                if timer is not None:
                    timer.cancel()
        source = Source.REDIS
        cache = self._cache
        for key_id, (_, codec) in misses.items():
            landed = waits[key_id].result
            entry = None if landed is None else landed.get(key_id)
            if entry is None:  # the deadline passed first
                if late is not None:
                    late.append(codec.name)
                last = cache.last(key_id, now)
                if last is None:
                    entry = codec.defaults[Reason.DEADLINE]
                    metrics.DEADLINE_EXCEEDED.labels(codec.name, "default").inc()
                else:
                    entry = codec.on_deadline(last[0], last[1], last[2])
                    metrics.DEADLINE_EXCEEDED.labels(codec.name, "stale").inc()
            read_id = entry[1]
            read = codec.reads[read_id][0]
            served[key_id] = entry[0], read, 2 * read_id, entry[2]
            if read.reason in NOT_CACHED:
                source = Source.DEFAULT
            elif read.source is Source.BACKING and source is Source.REDIS:
                source = Source.BACKING
        return source

    def _start(self, keys: list[Key], flight: _Flight, deadline: float) -> bool:
        """Start the read on the first tier without a task, if it can (Redis on its
        multiplexed connection): its answers then land inside the callback that parsed
        them, one loop iteration sooner at each end. Keys it leaves unanswered go on to
        the next tiers in a task. False if the first tier cannot (the caller makes the
        read a task)."""
        first = self._tiers[0]
        if not isinstance(first, RedisTier) or self._carried[0] is not None:
            return False

        def answered(answers: list[Answer]) -> None:
            self._started -= 1
            if not self._started and self._idle is not None:
                self._idle.set()
            try:
                result: dict[str, Entry] = {}
                left: list[Key] = []
                reasons: list[Reason] = []
                _take(keys, answers, result, left, reasons)
            except Exception as exc:  # a bug: readers get unavailable, nothing is cached
                logger.error("feature read failed unexpectedly", exc_info=exc)
                self._land(keys, flight, {}, fill=False)
                return
            if left and self._asks_later(left):  # the next tiers, in a task as any read
                self._spawn(self._fetch(keys, flight, deadline, 1, result, left, reasons))
                return
            self._default(left, reasons, result)  # here: a task would cost an iteration
            self._land(keys, flight, result, fill=True)

        if not first.start(keys, deadline, answered):
            return False
        self._started += 1
        return True

    def _spawn(self, fetch: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(fetch)
        self._reads.add(task)
        task.add_done_callback(self._read_done)

    async def _fetch(
        self,
        keys: list[Key],
        flight: _Flight,
        deadline: float,
        first: int = 0,
        result: dict[str, Entry] | None = None,
        pending: list[Key] | None = None,
        reasons: list[Reason] | None = None,
    ) -> None:
        """Ask each tier in turn, from `first`, for the keys still unanswered (`pending`,
        with the `reasons` the tier before gave; all of `keys` by default), then land the
        flight and fill the cache. Runs as its own task, so a reply after the deadline
        (or the caller's cancellation) still lands; its result goes to every reader
        waiting on `flight`."""
        result = {} if result is None else result
        if pending is None or reasons is None:
            pending, reasons = keys, [Reason.UNAVAILABLE] * len(keys)
        try:
            tiers = zip(self._tiers[first:], self._carried[first:], strict=True)
            for tier, carried in tiers:
                left: list[Key] = []
                kept: list[Reason] = []
                asked = pending
                if carried is not None:  # the others keep the reason they had
                    asked = []
                    for key, reason in zip(pending, reasons, strict=True):
                        if key.group.qualified_name in carried:
                            asked.append(key)
                        else:
                            left.append(key)
                            kept.append(reason)
                    if not asked:
                        continue
                _take(asked, await tier.read(asked, deadline), result, left, kept)
                pending, reasons = left, kept
                if not pending:
                    break
            self._default(pending, reasons, result)
        except BaseException:
            # On cancellation and errors too (result then lacks keys: readers get
            # unavailable), so readers never wait forever.
            self._land(keys, flight, result, fill=False)
            raise
        self._land(keys, flight, result, fill=True)

    def _asks_later(self, keys: list[Key]) -> bool:
        """Whether a tier after the first carries the group of any of `keys`."""
        for carried in self._carried[1:]:
            if carried is None or any(key.group.qualified_name in carried for key in keys):
                return True
        return False

    def _default(self, keys: list[Key], reasons: list[Reason], result: dict[str, Entry]) -> None:
        """The defaults of each key no tier answered, with the reason the last one gave."""
        codecs = self._codecs
        for key, reason in zip(keys, reasons, strict=True):
            result[key.id] = codecs[key.group.qualified_name].defaults[reason]

    def _land(
        self, keys: list[Key], flight: _Flight, result: dict[str, Entry], *, fill: bool
    ) -> None:
        """The read is over: out of the single-flight maps, its result (unavailable for
        keys it lacks) to every reader, and, if `fill`, into the cache."""
        inflight = self._inflight
        codecs = self._codecs
        for key in keys:
            key_id = key.id
            if inflight.get(key_id) is flight:
                del inflight[key_id]
            if key.member_of:
                self._forget_member_flight(key, flight)
            if key_id not in result:
                result[key_id] = codecs[key.group.qualified_name].defaults[Reason.UNAVAILABLE]
        flight.land(result)
        if not fill:
            return
        now = self._timer()
        cache = self._cache
        session, dropped = flight.session, flight.dropped
        for key in keys:
            entry = result[key.id]
            if dropped is not None and key.id in dropped:
                continue  # invalidated while in flight: this reply may predate the write
            codec = codecs[key.group.qualified_name]
            if codec.reads[entry[1]][0].reason not in NOT_CACHED:
                cache.put(
                    key.id, entry, now, session if codec.tracked else UNTRACKED, key.member_of
                )

    def _invalidate(self, key_ids: list[str] | None) -> None:
        """Redis says these keys changed (None: all of them, a flush): drop them from the
        cache, and keep the reads in flight for them from caching their replies."""
        cache, inflight = self._cache, self._inflight
        if key_ids is None:
            self._invalidated["dropped"].inc(len(cache))
            cache.clear()
            for key_id, joined in inflight.items():
                joined.drop(key_id)
            return
        dropped = in_flight = absent = 0
        members_inflight = self._inflight_members
        for key_id in key_ids:
            held = cache.drop(key_id)  # with its member entries
            dropped += held
            absent += not held
            flight = inflight.get(key_id)
            if flight is not None:
                flight.drop(key_id)
                in_flight += 1
            members = members_inflight.get(key_id)
            if members is not None:
                for member_id, joined in members.items():
                    joined.drop(member_id)
                in_flight += len(members)
        self._invalidated["dropped"].inc(dropped)
        self._invalidated["in_flight"].inc(in_flight)
        self._invalidated["absent"].inc(absent)

    def _forget_member_flight(self, key: Key, flight: _Flight) -> None:
        members = self._inflight_members.get(key.member_of)
        if members is not None and members.get(key.id) is flight:
            del members[key.id]
            if not members:
                del self._inflight_members[key.member_of]

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._reads.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("feature read failed unexpectedly", exc_info=exc)

    async def wait_repairs(self) -> None:
        """Wait for the reads and read repairs in flight (tests, shutdown)."""
        while self._reads or self._started:
            if self._started:
                if self._idle is None or self._idle.is_set():
                    self._idle = asyncio.Event()
                await self._idle.wait()
            await asyncio.gather(*self._reads, return_exceptions=True)
        if self._backing is not None:
            await self._backing.wait_repairs()

    async def aclose(self) -> None:
        """Finish reads and read repairs, stop probes, close the backing store and the
        multiplexed connection; the Redis client is the caller's."""
        await self.wait_repairs()
        self.flush_health()
        for tier in self._tiers:
            await tier.aclose()


def _take(
    keys: Sequence[Key],
    answers: Sequence[Answer],
    result: dict[str, Entry],
    left: list[Key],
    reasons: list[Reason],
) -> None:
    """A tier's answers sorted: entries into `result`, the keys it could not answer (and
    why) onto `left` and `reasons`, for the next tier."""
    for key, answer in zip(keys, answers, strict=True):
        if isinstance(answer, Reason):
            left.append(key)
            reasons.append(answer)
        else:
            result[key.id] = answer


class _Flight:
    """One read in flight, shared by every request that wants its keys (single-flight):
    its result once it lands, and the requests waiting for it."""

    __slots__ = ("dropped", "result", "session", "waiters")

    def __init__(self, session: int) -> None:
        self.result: dict[str, Entry] | None = None
        self.waiters: list[_Waiter] = []
        # The invalidation session live when the read was sent (UNTRACKED if none): what
        # its entries are cached under. Keys invalidated meanwhile are not cached.
        self.session = session if session > 0 else UNTRACKED
        self.dropped: set[str] | None = None

    def drop(self, key_id: str) -> None:
        if self.dropped is None:
            self.dropped = set()
        self.dropped.add(key_id)

    def land(self, result: dict[str, Entry]) -> None:
        # Wakes each waiter itself: a done-callback on a shared future would cost every
        # reader one more loop iteration.
        self.result = result
        for waiter in self.waiters:
            waiter.landed()


class _Waiter:
    """One request waiting until all its flights have landed, or its deadline."""

    __slots__ = ("future", "left")

    def __init__(self, future: asyncio.Future[None], flights: int) -> None:
        self.future = future
        self.left = flights

    def landed(self) -> None:
        self.left -= 1
        if not self.left:
            self.wake()

    def wake(self) -> None:
        if not self.future.done():  # else woken already, or its request was cancelled
            self.future.set_result(None)
