"""The Redis tier: one pipelined round trip for every key of a read, behind a circuit
breaker.

Each group's codec gives the commands for its keys (HMGET for a hash, GET for an
embedding, ZCARD and ZCOUNT or ZSCORE for a sorted set) and decodes their replies; all
of them go out through redis-py's pipeline, or (`multiplex=True`, standalone and
Sentinel) through the tier's own multiplexed connection (features/online/multiplex.py),
which needs no pool checkout and shares writes between concurrent requests. Cluster
clients always use the cluster pipeline. Everything after the round trip is the same.
With `tracking`, the multiplexed connection is also the cache's invalidation session
(features/online/tracking.py); the tier starts its keeper and stops it."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from features import looplag, metrics
from features._log import RateLimitedLog
from features.breaker import CircuitBreaker
from features.connection import Client
from features.online.entry import Reason
from features.online.keys import Key
from features.online.multiplex import Multiplexed, Replies
from features.online.reads import Codec
from features.online.tier import Answer, Answered
from features.online.tracking import Tracking
from features.spec import FeatureGroup
from features.tracing import TRACING

logger = logging.getLogger(__name__)

_FAILURES = (TimeoutError, RedisError, OSError)


class RedisTier:
    """ONE non-transactional pipeline per read; failures become reasons.

    While the breaker is open a read answers at once without touching the network, and
    one PING at a time, off the request path, asks whether Redis is back (and fast),
    through the same connection as the reads. With `multiplex`, the tier owns its
    connection and closes it in `aclose`; `client` stays the caller's either way.
    """

    name = "redis"

    def __init__(
        self,
        client: Client,
        codecs: Mapping[str, Codec],
        *,
        breaker: CircuitBreaker | None = None,
        multiplex: bool = False,
        tracking: Tracking | None = None,
        probe_slow_s: float | None = None,
        error_log_interval_s: float = 10.0,
        timer: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._codecs = codecs
        self._mux: Multiplexed | None = None
        self._tracking: Tracking | None = None
        if multiplex and isinstance(client, aioredis.Redis):
            self._mux = Multiplexed.for_client(client, listener=tracking)
            self._tracking = tracking
        self.breaker = breaker or CircuitBreaker(timer=timer)
        self._probe_slow_s = probe_slow_s
        self._clock = clock  # wall time, for event-time freshness
        self._log = RateLimitedLog(logger, error_log_interval_s)
        self._bugs = RateLimitedLog(
            logger, error_log_interval_s, level=logging.ERROR, exc_info=True
        )
        self._up = False  # as last written to features_redis_up
        # More than one when a late read's failure reopened the breaker under a probe.
        self._probes: set[asyncio.Task[None]] = set()  # referenced, so none is collected
        self._closed = False
        self._lag = looplag.IDLE  # until `open`

    async def open(self) -> None:
        """Open the multiplexed connection, if any (pooled ones open on first use), and
        start watching the loop's lateness for the slow-call rule."""
        if self._lag is looplag.IDLE:
            self._lag = looplag.acquire()
        if self._mux is not None:
            try:
                await self._mux.connect()
            except _FAILURES as exc:
                # Not fatal: the first read connects again, and its failure is counted.
                logger.warning(
                    "Redis connection not opened at start (%s: %s)", type(exc).__name__, exc
                )
            if self._tracking is not None:
                self._tracking.start(self._mux)  # and reconnects, if that failed

    async def read(self, keys: Sequence[Key], deadline: float) -> list[Answer]:
        """Each key's entry (missing keys decode to their defaults: final), or a Reason."""
        breaker = self.breaker
        if not breaker.allow():
            if not self._closed and breaker.claim_probe():
                # Off the request path: no request waits to learn whether Redis is back.
                probe = asyncio.create_task(self._probe())
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)
            return [Reason.CIRCUIT_OPEN] * len(keys)
        started, late_s, span = self._begin(len(keys))
        outcome: list[Any] | BaseException
        try:
            outcome = await self._round_trip(keys, self._clock())
        except _FAILURES as exc:
            outcome = exc
        except BaseException:
            if span is not None:
                span.end()
            raise
        return self._answered(keys, outcome, started, late_s, deadline, span)

    def start(self, keys: Sequence[Key], deadline: float, then: Answered) -> bool:
        """`read` without a task of its own, on the multiplexed connection: the commands
        are queued for the next flush now, and `then` gets the answers inside the callback
        that parsed the replies, so the read costs no loop iteration at either end. False,
        with nothing sent, where only `read` can do it: no multiplexed connection, or the
        breaker not closed (`read` answers those at once, and probes)."""
        mux = self._mux
        if mux is None or not self.breaker.allow():
            return False
        started, late_s, span = self._begin(len(keys))
        payload, n_replies = self._packed(keys, self._clock())

        def landed(flat: Replies | RedisError) -> None:
            try:
                outcome = flat if isinstance(flat, RedisError) else self._split(keys, flat)
                answers = self._answered(keys, outcome, started, late_s, deadline, span)
            except Exception as exc:  # a bug: the readers still get an answer
                self._bugs.failed("Redis read's decode", exc, len(keys))
                answers = [Reason.UNAVAILABLE] * len(keys)
            then(answers)

        if span is None:
            mux.request_then(payload, n_replies, landed)
        else:
            # The replies, or the connection's failure, may be parsed in any callback (a
            # connection lost before the request's write lands fails it there): run this
            # read's end in the request's context, so its log lines carry its trace.
            request = contextvars.copy_context()
            mux.request_then(payload, n_replies, lambda flat: request.run(landed, flat))
        return True

    def _begin(self, n_keys: int) -> tuple[float, float, Span | None]:
        """A read's start: loop time, the loop's lateness so far, its span if tracing."""
        tracer = TRACING.active()
        span = None if tracer is None else self._start_span(tracer, n_keys)
        return asyncio.get_running_loop().time(), self._lag.late_s(), span

    def _answered(
        self,
        keys: Sequence[Key],
        outcome: list[Any] | BaseException,
        started: float,
        late_s: float,
        deadline: float,
        span: Span | None,
    ) -> list[Answer]:
        """What a read's replies (one per key, a list for several commands) or its failure
        answer, told to the breaker and the metrics."""
        breaker = self.breaker
        if isinstance(outcome, BaseException):
            if not _pool_exhausted(outcome):  # our own backlog is no sign that Redis is down
                breaker.failure()
            kind = self._failed(outcome, len(keys))
            if span is not None:
                span.set_attribute("error.type", kind)
                span.set_status(StatusCode.ERROR, f"{type(outcome).__name__}: {outcome}")
                span.end()
            return [Reason.UNAVAILABLE] * len(keys)
        if span is not None:
            span.end()
        # Slow if it ended after the deadline even without the time the loop was too busy
        # to read the reply (a busy worker is not a slow Redis).
        ended = asyncio.get_running_loop().time()
        if started < deadline < self._lag.discounted(ended, late_s):
            breaker.slow()
        else:
            breaker.success()
        if not self._up:
            metrics.REDIS_UP.set(1)
            self._up = True
        replies = outcome
        codecs = self._codecs
        now = self._clock()
        # Per group, all its keys at once: a hash's found replies are parsed together.
        positions: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            positions.setdefault(key.group.qualified_name, []).append(i)
        if len(positions) == 1:
            ((name, _),) = positions.items()
            return codecs[name].answer(replies, now)
        answers: list[Answer] = [Reason.MISSING] * len(keys)
        for name, where in positions.items():
            group_answers = codecs[name].answer([replies[i] for i in where], now)
            for i, answer in zip(where, group_answers, strict=True):
                answers[i] = answer
        return answers

    def carries(self, group: FeatureGroup) -> bool:
        """Every group: Redis holds them all."""
        return True

    async def aclose(self) -> None:
        """Stop every probe in flight and start no more, so none outlives the client,
        then close the multiplexed connection; the client is the caller's to close."""
        self._closed = True
        if self._lag is not looplag.IDLE:
            looplag.release(self._lag)
            self._lag = looplag.IDLE
        for task in self._probes:
            task.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        if self._tracking is not None:
            await self._tracking.aclose()
        if self._mux is not None:
            await self._mux.aclose()

    def _start_span(self, tracer: Tracer, n_keys: int) -> Span:
        # A child of the current span: the feature step's, copied into the read's task.
        return tracer.start_span(
            "features.redis",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "redis",
                "db.operation.name": "HMGET",
                "db.operation.batch.size": n_keys,
                "features.multiplexed": self._mux is not None,
            },
        )

    async def _round_trip(self, keys: Sequence[Key], now: float) -> list[Any]:
        """Each key's commands, all in one round trip; per key its reply, or the list of
        its replies for a group of several commands; error replies come back as values.
        `now` (wall time) bounds time windows, e.g. ZCOUNT's."""
        mux = self._mux
        if mux is not None:
            payload, n_replies = self._packed(keys, now)
            return self._split(keys, await mux.request(payload, n_replies))
        codecs = self._codecs
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                for args in codecs[key.group.qualified_name].commands(key, now):
                    pipe.execute_command(*args)
            return self._split(keys, await pipe.execute(raise_on_error=False))

    def _packed(self, keys: Sequence[Key], now: float) -> tuple[bytes, int]:
        """Every key's commands in RESP, in one payload, and how many replies they get."""
        codecs = self._codecs
        per_key = [codecs[key.group.qualified_name] for key in keys]
        payload = b"".join([codec.pack(key, now) for codec, key in zip(per_key, keys, strict=True)])
        return payload, sum([codec.n_replies for codec in per_key])

    def _split(self, keys: Sequence[Key], flat: list[Any]) -> list[Any]:
        """The replies of one round trip, per key (a list for a group of several)."""
        if len(flat) == len(keys):
            return flat
        codecs = self._codecs
        replies: list[Any] = []
        at = 0
        for key in keys:
            n = codecs[key.group.qualified_name].n_replies
            replies.append(flat[at] if n == 1 else flat[at : at + n])
            at += n
        return replies

    async def _probe(self) -> None:
        """The half-open breaker's question: PING, under the same timeouts; an answer
        slower than `probe_slow_s` keeps the breaker open."""
        loop = asyncio.get_running_loop()
        started, late_s = loop.time(), self._lag.late_s()
        try:
            if self._mux is None:
                await self.client.ping()
            else:
                await self._mux.ping()
        except _FAILURES as exc:
            if _pool_exhausted(exc):
                self.breaker.abandon()  # no answer either way: the next read probes
            else:
                self.breaker.failure()
            self._failed(exc, 0)
        except BaseException:
            self.breaker.abandon()  # cancelled (shutdown)
            raise
        else:
            slow_s = self._probe_slow_s
            took = self._lag.discounted(loop.time(), late_s) - started
            if slow_s is not None and took > slow_s:
                self.breaker.slow()
                metrics.REDIS_ERRORS.labels("slow_probe").inc()
            else:
                self.breaker.success()
                metrics.REDIS_UP.set(1)
                self._up = True

    def _failed(self, exc: BaseException, n_keys: int) -> str:
        """Count and (rate-limited) log one failure; returns its kind (the metric label)."""
        if _pool_exhausted(exc):
            kind = "pool_exhausted"
        elif isinstance(exc, RedisTimeoutError | TimeoutError):
            kind = "timeout"
        else:
            kind = type(exc).__name__
        metrics.REDIS_ERRORS.labels(kind).inc()
        if kind != "pool_exhausted":
            metrics.REDIS_UP.set(0)
            self._up = False
        self._log.failed("Redis read", exc, n_keys)
        return kind


def _pool_exhausted(exc: BaseException) -> bool:
    """True for BlockingConnectionPool's timeout waiting for a free connection."""
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, TimeoutError)
