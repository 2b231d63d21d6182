"""How busy an event loop is: the lateness of a timer that asks to run every 2 ms.

A reply that reaches a worker while its loop runs other requests waits for them, so a read
can finish after its deadline although the store answered in time. The breakers' slow-call
rule subtracts the loop's lateness over the read (`late_s` at its end minus at its start)
from the read's time, so a busy worker is not taken for a slow store; admission control
reads each interval's smallest lateness as its queueing delay (CoDel's signal).

One sampler per loop, shared by everyone who `acquire`s it (a tier, the admission
middleware) and stopped by the last `release`: ~500 timer callbacks a second in all.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref


class LoopLag:
    """Sums how late the loop runs a timer due every `SAMPLE_S`."""

    SAMPLE_S = 0.002

    def __init__(self) -> None:
        self._late_s = 0.0
        self._smallest = math.inf
        self._due = math.inf
        self._users = 0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def late_s(self) -> float:
        """The loop's lateness summed since the sampler started, counting the sample that
        is overdue now but has not run yet (a read that ends inside a long stall sees it)."""
        return self._late_s + max(0.0, time.monotonic() - self._due)

    def discounted(self, ended: float, late_s: float) -> float:
        """`ended` (a time) less the loop's lateness since `late_s` was read from
        `late_s()`: when a call would have ended had the loop not been busy. The breakers
        judge a read slow by this, so that a busy worker is not taken for a slow store."""
        return ended - (self.late_s() - late_s)

    def take_smallest(self) -> float:
        """The smallest lateness since the last call (inf if no sample ran)."""
        smallest, self._smallest = self._smallest, math.inf
        return smallest

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        # time.monotonic, not loop.time: uvloop's clock is cached per loop iteration.
        self._due = time.monotonic() + self.SAMPLE_S
        self._handle = self._loop.call_later(self.SAMPLE_S, self._tick)

    def _tick(self) -> None:
        late = max(0.0, time.monotonic() - self._due)
        self._late_s += late
        if late < self._smallest:
            self._smallest = late
        self._schedule()

    def _stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle, self._due = None, math.inf


IDLE = LoopLag()
"""A sampler never started: its lateness is always 0 (a tier before `open`, or after)."""

_SAMPLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = (
    weakref.WeakKeyDictionary()
)


def acquire() -> LoopLag:
    """The running loop's sampler, started by its first user."""
    loop = asyncio.get_running_loop()
    lag = _SAMPLERS.get(loop)
    if lag is None:
        lag = _SAMPLERS[loop] = LoopLag()
    lag._users += 1
    if lag._users == 1:
        lag._start(loop)
    return lag


def release(lag: LoopLag) -> None:
    """One user is done with `lag`; the last one stops it."""
    lag._users -= 1
    if lag._users <= 0:
        lag._users = 0
        lag._stop()
