"""Admission control: refuse at once, with 503 and Retry-After, what the worker cannot serve
inside its budget, before any parsing or feature work.

A worker is one event loop on one CPU. A request's time is the wait before the loop
reaches it plus its own time once admitted. The loop's lag sampler (features/looplag.py)
measures the first directly (how late a timer fires: the smallest delay in an interval is
the standing queue, CoDel's signal) and
the middleware times the second. `ConcurrencyLimit` adapts the number of requests admitted
at once to their sum, AIMD: over the target latency with at least half the limit in
flight, the limit shrinks by a factor; under it, while the limit is what refuses requests,
it grows by one. Refusing is not free, so under heavy overload the queue ahead of
admission is mostly refusals: the limit then shrinks until the CPU the admitted requests
give up serves the refusals in time. A Redis that is slow but alive costs a request at most
the feature deadline, below the default target, so it is not refused for that.

A caller may send its remaining budget in `x-envoy-expected-rq-timeout-ms` (Envoy's
header, milliseconds); a request whose budget is below the time admitted requests take now
is refused rather than started.

BentoML adds a service's middleware inside its own (traffic metrics, the tracing
middleware, the request timeout), which would make every refusal pay for them. When the
lifespan starts, Starlette has built the app's middleware stack once and for all, and the
lifespan's scope names the app: the middleware then puts its decision in front of that
whole stack (`Starlette.middleware_stack`) and, in its own place, passes requests on. An
app that is not Starlette's keeps it in place.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from features import looplag

BUDGET_HEADER = b"x-envoy-expected-rq-timeout-ms"
# Probes and scrapes are never refused: an overloaded worker is alive and ready.
BYPASS_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})

MESSAGES = {
    "limit": "overloaded: this worker is serving all the requests it can in budget",
    "budget": "the request's budget (x-envoy-expected-rq-timeout-ms) is shorter than "
    "requests take now",
}
REASONS = tuple(MESSAGES)

LIMIT = Gauge(
    "fraud_admission_limit",
    "Requests this worker admits at once",
    multiprocess_mode="liveall",
)
IN_FLIGHT = Gauge(
    "fraud_admission_in_flight",
    "Most requests admitted and not yet answered at once in the last 100 ms",
    multiprocess_mode="liveall",
)
QUEUE_DELAY = Gauge(
    "fraud_admission_queue_delay_seconds",
    "Smallest event-loop delay seen in the last interval",
    multiprocess_mode="liveall",
)
WORKER_REQUESTS = Gauge(
    "fraud_worker_requests",
    "Requests this worker admitted since it started, per live worker (pid): how evenly "
    "the workers share the load",
    multiprocess_mode="liveall",
)
REFUSED = Counter(
    "fraud_admission_refused_total",
    "Requests refused before any work: limit (overloaded) or budget (caller's too short)",
    ["reason"],
)


@dataclass(frozen=True)
class AdmissionConfig:
    """How the limit adapts; see serving/runtime.py for the FRAUD_ADMISSION_* variables."""

    enabled: bool = True
    initial_limit: int = 32
    min_limit: int = 4
    max_limit: int = 256
    target_s: float = 0.02
    interval_s: float = 0.1
    decrease: float = 0.8
    retry_after_s: int = 1


class ConcurrencyLimit:
    """The number of requests admitted at once, adapted once an interval to the queueing
    delay measured in it (pure logic: the caller supplies the measurements)."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.limit = float(config.initial_limit)

    def update(self, latency_s: float, peak: int, limited: bool) -> int:
        """One interval's latency (queueing delay plus admitted time), the most requests
        in flight at once in it, and whether the limit refused any; returns the new limit.

        Slow requests shrink the limit only when they were many (at least half the
        limit in flight): a few slowed by something else (a noisy neighbour, a slow
        dependency) are not a queue that refusing would shorten."""
        config = self.config
        if latency_s > config.target_s and peak >= self.limit / 2:
            self.limit = max(config.min_limit, self.limit * config.decrease)
        elif limited:
            self.limit = min(config.max_limit, self.limit + 1)
        return int(self.limit)


ASGIApp = Any


class Admission:
    """ASGI middleware: admit a request if fewer than the limit are in flight and the
    caller's budget (if sent) covers what admitted requests take now; else 503."""

    def __init__(self, app: ASGIApp, config: AdmissionConfig) -> None:
        self.app = app
        self.config = config
        self.limit = ConcurrencyLimit(config)
        self.admitted = 0
        self._limited = False  # the limit refused a request this interval
        self._service_s = 0.0  # moving average of an admitted request's time
        self._delay_s = 0.0  # the last interval's queueing delay
        self._interval_s = 0.0  # admitted time summed over this interval
        self._interval_n = 0
        self._peak = 0  # most requests in flight at once this interval
        self._total = 0  # admitted requests answered since start, as of the last interval
        self._lag: looplag.LoopLag | None = None
        self._interval: asyncio.TimerHandle | None = None
        self._in_front = False  # deciding in front of the app's whole middleware stack
        # A refusal is built ahead: under overload it is most of what the worker sends.
        self._refusals = {reason: _refusal(reason, config) for reason in REASONS}
        self._refused = {reason: REFUSED.labels(reason) for reason in REASONS}
        # Counted here and added to the counter once an interval, as the gauges are: a
        # multiprocess counter's update takes a lock, checks the pid and writes an mmap.
        self._refused_since = dict.fromkeys(REASONS, 0)
        LIMIT.set(int(self.limit.limit))
        IN_FLIGHT.set(0)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self._move_to_front(scope.get("app"))
            try:
                await self.app(scope, receive, send)  # returns when the worker shuts down
            finally:
                self._stop_monitor()
            return
        if self._in_front:  # decided in front of the stack already
            await self.app(scope, receive, send)
            return
        await self._admit(self.app, scope, receive, send)

    def _move_to_front(self, app: Any) -> None:
        """Decide in front of Starlette's built middleware stack from now on."""
        stack = getattr(app, "middleware_stack", None)
        if stack is not None and not self._in_front:
            app.middleware_stack = functools.partial(self._admit, stack)
            self._in_front = True

    async def _admit(self, app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in BYPASS_PATHS:
            await app(scope, receive, send)
            return
        if self._lag is None:
            self._start_monitor()
        if self.admitted >= self.limit.limit:
            self._limited = True
            await self._refuse(send, "limit")
            return
        budget = _budget_s(scope)
        if budget is not None and budget < self._service_s + self._delay_s:
            await self._refuse(send, "budget")
            return
        self.admitted += 1
        self._peak = max(self._peak, self.admitted)
        started = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            self.admitted -= 1
            took = time.perf_counter() - started
            self._service_s += 0.05 * (took - self._service_s)
            self._interval_s += took
            self._interval_n += 1

    def _start_monitor(self) -> None:
        self._lag = looplag.acquire()
        self._interval = asyncio.get_running_loop().call_later(
            self.config.interval_s, self._on_interval
        )

    def _flush_refused(self) -> None:
        for reason, n in self._refused_since.items():
            if n:
                self._refused[reason].inc(n)
                self._refused_since[reason] = 0

    def _stop_monitor(self) -> None:
        self._flush_refused()
        if self._interval is not None:
            self._interval.cancel()
        if self._lag is not None:
            looplag.release(self._lag)
        self._lag = self._interval = None

    def _on_interval(self) -> None:
        assert self._lag is not None
        self._interval = asyncio.get_running_loop().call_later(
            self.config.interval_s, self._on_interval
        )
        min_delay_s = self._lag.take_smallest()
        if min_delay_s == math.inf:  # no sample ran in the interval: none was due before
            min_delay_s = 0.0
        admitted_s = self._interval_s / self._interval_n if self._interval_n else 0.0
        LIMIT.set(self.limit.update(min_delay_s + admitted_s, self._peak, self._limited))
        IN_FLIGHT.set(self._peak)  # once an interval: a gauge write costs a lock and a pid check
        QUEUE_DELAY.set(min_delay_s)
        self._total += self._interval_n
        WORKER_REQUESTS.set(self._total)
        self._delay_s = min_delay_s
        self._flush_refused()
        self._limited = False
        self._interval_s, self._interval_n, self._peak = 0.0, 0, self.admitted

    async def _refuse(self, send: Any, reason: str) -> None:
        self._refused_since[reason] += 1
        start, body = self._refusals[reason]
        # Copies: a middleware outside this one may add headers to what it is sent.
        await send({**start, "headers": list(start["headers"])})
        await send(dict(body))


def _refusal(reason: str, config: AdmissionConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages of a 503 for `reason`."""
    body = json.dumps({"error": MESSAGES[reason], "reason": reason}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(config.retry_after_s).encode()),
    ]
    return (
        {"type": "http.response.start", "status": 503, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


def _budget_s(scope: dict[str, Any]) -> float | None:
    for name, value in scope["headers"]:
        if name == BUDGET_HEADER:
            try:
                ms = float(value)
            except ValueError:
                return None  # a header we cannot read limits nothing
            return ms / 1e3 if math.isfinite(ms) and ms >= 0 else None
    return None
