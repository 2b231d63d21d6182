"""A circuit breaker: while a store (Redis, the backing store) is down or slow, no read waits
on it.

CLOSED     every read goes to the store. Two rules open it: `failure_threshold` failures
           in a row, or `slow_threshold` slow calls among its last `window` calls (a
           call is slow when it answered, but after the request's deadline; the
           slow-call rate of resilience4j). A slow store fails nothing, so only the
           second rule sees it.
OPEN       no read goes to it (callers serve defaults at once) for `reset_s`.
HALF_OPEN  one caller claims the probe: for Redis a PING sent off the request path
           (reads still get defaults), for the backing store one read under its
           deadline. Its success closes the breaker, its failure opens it for another
           `reset_s`. A probe that answers slowly counts as a failure.

One event loop owns a breaker (like the store's cache), so it needs no lock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum

from features import metrics


class State(IntEnum):
    """Breaker state; its value is the `features_breaker_state{dependency}` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Counts failures and slow calls of one dependency and stops calls while it is down
    or slow."""

    def __init__(
        self,
        *,
        name: str = "redis",
        failure_threshold: int = 5,
        slow_threshold: int = 5,
        window: int = 10,
        reset_s: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and reset_s > 0")
        if not 1 <= slow_threshold <= window:
            raise ValueError("slow_threshold must be between 1 and window")
        self._state_gauge = metrics.BREAKER_STATE.labels(name)
        self._name = name
        self._threshold = failure_threshold
        self._reset_s = reset_s
        self._timer = timer
        self._state = State.CLOSED
        self._failures = 0
        self._slow_threshold = slow_threshold
        self._recent: deque[bool] = deque(maxlen=window)  # True: that call was slow
        self._slow = 0  # slow calls in _recent
        self._opened_at = 0.0
        self._probing = False
        self._state_gauge.set(State.CLOSED)

    @property
    def state(self) -> State:
        """The current state, moving OPEN to HALF_OPEN once `reset_s` has passed."""
        if self._state is State.OPEN and self._timer() - self._opened_at >= self._reset_s:
            self._move(State.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """True if a call may go to the network now (the breaker is closed)."""
        return self.state is State.CLOSED

    def claim_probe(self) -> bool:
        """True, once per half-open window, for the caller that should send the probe;
        it then reports the outcome with `success()`, `failure()` or `abandon()`."""
        if self.state is State.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        """The dependency answered in time."""
        self._failures = 0
        self._probing = False
        if self._state is not State.CLOSED:
            self._move(State.CLOSED)
        self._record(slow=False)

    def slow(self) -> None:
        """The dependency answered, but after the deadline: a failed probe, and in the
        closed state one slow call of the window."""
        self._probing = False
        if self._state is State.HALF_OPEN:
            self._open()
        elif self._state is State.CLOSED:
            self._record(slow=True)
            if self._slow >= self._slow_threshold:
                self._open()

    def failure(self) -> None:
        """The dependency failed or timed out."""
        self._probing = False
        if self._state is State.HALF_OPEN:
            self._open()
        elif self._state is State.CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()
        # Already OPEN: a call that started before it opened; the window stands.

    def abandon(self) -> None:
        """The probe or call ended without an answer either way (cancelled, refused
        locally); the next caller may probe."""
        self._probing = False

    def _record(self, *, slow: bool) -> None:
        recent = self._recent
        if len(recent) == recent.maxlen and recent[0]:
            self._slow -= 1  # the oldest call leaves the window
        recent.append(slow)
        self._slow += slow

    def _open(self) -> None:
        self._opened_at = self._timer()
        self._failures = 0
        self._recent.clear()
        self._slow = 0
        self._move(State.OPEN)

    def _move(self, state: State) -> None:
        self._state = state
        self._state_gauge.set(state)
        metrics.BREAKER_TRANSITIONS.labels(self._name, state.name.lower()).inc()
